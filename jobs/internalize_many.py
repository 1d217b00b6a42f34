"""Internalize every prompt of a manifest as one Ray job (the cluster path of genpi's pipeline).

    ray job submit --working-dir . -- python jobs/internalize_many.py \\
        --manifest prompts/ --store s3://bucket/genpi [--config cluster.yaml] [key.sub=value ...]
    python jobs/internalize_many.py --manifest examples/prompts/   # local Ray, embedded model, CPU

Synthesis and evaluation run on Ray Data engine actors, training on Ray Train + DeepSpeed;
`genpi internalize` runs the same pipeline in one process without Ray.

Overrides: any config setting as key.sub=value after the options, e.g.
    train.epochs=2 cluster.synth_actors=4 model.revision=0123abc
Exit status: 0 every prompt published (or already was); 1 some prompts failed (each is recorded
with its stage and error in the run report); 2 bad input (config, manifest, model or store),
nothing started.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(usage="%(prog)s --manifest PATH [--store URI] [--config FILE] [--dry-run] [--force] "
                                       "[-v] [key.sub=value ...]",
                                 description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True, help="a YAML/JSONL prompt file or a folder of them")
    ap.add_argument("--store", help="a folder or an fsspec URI such as s3://bucket/genpi (default: config 'store')")
    ap.add_argument("--config", help="YAML config file (cluster resources, model, stage settings)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its token budget, run nothing")
    ap.add_argument("--force", action="store_true", help="redo every prompt, even those published unchanged")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logs, and tracebacks for bad input")
    args, overrides = ap.parse_known_args(argv)
    if any(o.startswith("-") for o in overrides):
        ap.error(f"unrecognized arguments: {' '.join(o for o in overrides if o.startswith('-'))}")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if not args.verbose:
        # Every actor loading the model would print transformers' progress bars and notices.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from genpi.errors import INPUT_ERRORS
    from genpi.config import load_config
    from genpi.pipeline.run import internalize

    try:
        cfg = load_config(args.config, overrides)
        if args.store:
            cfg = cfg.with_overrides({"store": args.store}, "--store")
        return internalize(args.manifest, cfg, "ray", dry_run=args.dry_run, force=args.force)
    except INPUT_ERRORS as e:
        if args.verbose:
            raise
        print(f"internalize_many: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
