"""Ray job entry point: serve every published adapter (same as `genpi serve`).

    ray job submit --working-dir . -- python jobs/serve.py --store s3://bucket/genpi [key.sub=value ...]

Thin on purpose: it parses the same arguments as `genpi serve` and runs the same code,
on the cluster the job runs in (RAY_ADDRESS), until the job is stopped.
"""
from __future__ import annotations

import sys

from genpi.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
