"""A training step on a second thread, with and without one malloc arena.

    python bench/thread_malloc.py [--steps 3] [--rounds 2]

Ray Train (v2) runs the train function on a second thread of its worker process. glibc gives
that thread its own malloc arena, whose heaps are mapped and unmapped as a step's
activations come and go. This measures the same fp32 LoRA training step (the embedded
SmolLM2, one adapter, 8 rows of 115 tokens, AdamW) on the main thread and on a second
thread, alternating in one process, once with the default allocator settings and once with
``MALLOC_ARENA_MAX=1`` (what genpi.rayinit gives a local Ray's processes); each
configuration is its own child process (glibc reads the setting at start), run twice,
alternating with the other, keeping the faster run. Prints
seconds per step, page faults per step and the thread / main ratio of each configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time


def _child(steps: int, rounds: int) -> dict:
    import torch

    from genpi.config import ModelConfig
    from genpi.models import load_model
    from genpi.train.multilora import PackedLora

    torch.set_num_threads(os.cpu_count() or 1)
    model, _, _ = load_model(ModelConfig())
    pack = PackedLora(model, 1, 16, 32, seeds=[0])
    opt = torch.optim.AdamW(pack.parameters(), lr=1e-4)
    ids = torch.randint(100, 40000, (8, 115), generator=torch.Generator().manual_seed(0))

    def run(n: int) -> tuple[float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        for _ in range(n):
            with pack.route_to([0] * len(ids)):
                model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - t) / n, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // n

    def on_thread(n: int) -> tuple[float, int]:
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("r", run(n)))
        th.start()
        th.join()
        return out["r"]

    run(1)  # warm-up
    res: dict[str, list] = {"main": [], "thread": []}
    for _ in range(rounds):  # alternating: the host's speed drifts
        res["main"].append(run(steps))
        res["thread"].append(on_thread(steps))
    best = {k: min(v) for k, v in res.items()}
    return {"main_s": best["main"][0], "thread_s": best["thread"][0], "main_faults": best["main"][1],
            "thread_faults": best["thread"][1], "thread_over_main": best["thread"][0] / best["main"][0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.steps, args.rounds)))
        return
    rows: dict[str, dict] = {}
    for _ in range(2):  # the two configurations alternate, the best of each kept: the host drifts
        for name, extra in (("default", {}), ("MALLOC_ARENA_MAX=1", {"MALLOC_ARENA_MAX": "1"})):
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | extra
            out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps), "--rounds",
                                  str(args.rounds)], env=env, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if name not in rows or r["thread_s"] < rows[name]["thread_s"]:
                rows[name] = r
    print("| allocator | main thread s/step | second thread s/step | thread / main | page faults per step main / thread |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['main_s']:.2f} | {r['thread_s']:.2f} | **{r['thread_over_main']:.2f}x** | "
              f"{r['main_faults']:,} / {r['thread_faults']:,} |")


if __name__ == "__main__":
    main()
