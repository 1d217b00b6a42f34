"""Ray job entry point: serve every published adapter (same as `genpi serve`).

    ray job submit --working-dir . -- python jobs/serve.py --store s3://bucket/genpi [key.sub=value ...]

Thin on purpose: it parses the same arguments as `genpi serve` and runs the same code,
on the cluster the job runs in (RAY_ADDRESS), until the job is stopped. `ray job stop`
sends SIGTERM: it is handled like Ctrl-C, so the Serve app is deleted from the cluster
(it would otherwise keep serving after the job is gone) and the job exits 0.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from genpi.cli import main  # noqa: E402
from genpi.serve.lifecycle import sigterm_as_interrupt  # noqa: E402

if __name__ == "__main__":
    with sigterm_as_interrupt():
        try:
            rc = main(["serve", *sys.argv[1:]])
        except KeyboardInterrupt:  # stopped while the app was still deploying; start() removed it
            print("stopped before the app was up; removed it")
            rc = 0
    sys.exit(rc)
