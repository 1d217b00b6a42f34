#!/usr/bin/env bash
# RayJob entrypoint for clusters served by Ray Serve LLM (serve.backend=vllm):
#   internalize_and_export.sh --manifest DIR --config FILE [--store URI] [key.sub=value ...]
# runs jobs/internalize_many.py with these arguments, then copies the published adapters to
# the layout Ray Serve LLM loads (`genpi serve --export-lora`, same config, store and
# overrides), unless the batch job failed on bad input (exit 2). Exit status: the batch job's,
# or 1 when it succeeded but the export failed.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python "$here/jobs/internalize_many.py" "$@"
rc=$?
if [ "$rc" -ge 2 ]; then
  exit "$rc"
fi
# genpi serve takes --config, --store and overrides, not --manifest or --dry-run.
export_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --manifest) shift 2 || shift ;;
    --manifest=*|--dry-run) shift ;;
    *) export_args+=("$1"); shift ;;
  esac
done
genpi serve --export-lora "${export_args[@]}" || { [ "$rc" -eq 0 ] && rc=1; }
exit "$rc"
