"""Batch-internalize every prompt of a manifest as one Ray job.

    ray job submit --working-dir . -- python jobs/internalize_many.py \
        --manifest prompts/ --store s3://bucket/genpi [--config cluster.yaml] [key.sub=value ...]
    python jobs/internalize_many.py --manifest examples/prompts/   # local Ray, embedded model

Exit status: 0 when every prompt is published (or already was), 1 when some failed (each
is recorded with its error in the run report), 2 on bad input (nothing was started).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", required=True, help="a YAML/JSONL prompt file or a folder of them")
    ap.add_argument("--store", help="a folder or an fsspec URI such as s3://bucket/genpi (default: config 'store')")
    ap.add_argument("--config", help="YAML config (cluster resources, model, stage settings)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its token budget, run nothing")
    ap.add_argument("-v", "--verbose", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    if any(o.startswith("-") for o in overrides):
        ap.error(f"unrecognized arguments: {' '.join(o for o in overrides if o.startswith('-'))}")
    if not args.verbose:
        # Every actor loading the model would print transformers' progress bars and notices.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from genpi.batch import internalize_many
    from genpi.config import ConfigError, load_config
    from genpi.manifest import ManifestError
    from genpi.models import ModelError

    try:
        cfg = load_config(args.config, overrides)
        if args.store:
            cfg = cfg.with_overrides({"store": args.store}, "--store")
        return internalize_many(args.manifest, cfg, dry_run=args.dry_run)
    except (ConfigError, ManifestError, ModelError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"internalize_many: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
