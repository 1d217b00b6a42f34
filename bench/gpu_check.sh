#!/usr/bin/env bash
# GPU readiness in one command (see bench/gpu_check.py): the GPU tests (pytest -m gpu) and the
# GPU arms of bench/train.py, synth.py and efficiency.py, in under 8 minutes on one GPU, into
# one JSON file (default bench/results/gpu-check-<machine>.json) with everything measured and
# everything skipped, each with its reason. Needs torch, transformers, peft, deepspeed and
# pydantic (+ pytest for the tests); no Ray, no vLLM, no hub. PYTHON=... picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
exec "$PY" bench/gpu_check.py "$@"
