"""Synthesis output as the pipeline writes it (token ids, teacher top-k), made up quickly:
training tests (in-process and on Ray Train) start from these files instead of a synthesis run."""
from __future__ import annotations

import random

from genpi.store import Store
from genpi.train.jobs import TrainJob

REPLIES = ["Bonjour ! Je vais bien, merci.", "La tour Eiffel est a Paris.", "Il fait beau aujourd'hui.",
           "Voici une recette simple de crepes.", "Le chat dort sur le canape.", "Merci pour votre question."]


def write_synth(store: Store, pdir: str, tok, seed: int, n: int = 4, broken: bool = False) -> None:
    """Synthesis output as the pipeline writes it (token ids, teacher top-k), made up quickly."""
    rnd = random.Random(seed)
    inputs = [f"Question {seed}-{i}: tell me something about topic {i}." for i in range(n)]
    store.write_parquet(f"{pdir}/synth/inputs.parquet", [{"input": t, "split": "train"} for t in inputs])
    to_be = []
    for i, text in enumerate(inputs):
        reply = rnd.choice(REPLIES)
        ids = tok.encode(reply, add_special_tokens=False) + [tok.eos_token_id]
        topk_ids = [[t, *rnd.sample(range(1000, 2000), 3)] for t in ids]
        topk_lps = [[-0.3, -2.0, -2.5, -3.0] for _ in ids]
        to_be.append({"input_idx": i, "input": text, "sample": 0, "text": reply, "token_ids": ids,
                      "finish_reason": "stop", "topk_ids": topk_ids, "topk_logprobs": topk_lps})
    if not broken:  # a prompt whose synthesis never wrote its teacher replies
        store.write_parquet(f"{pdir}/synth/to_be.parquet", to_be)
    as_is = [{"input_idx": 0, "input": inputs[0], "sample": 0, "text": "Hello, I am fine.",
              "token_ids": [1], "finish_reason": "stop"}]
    store.write_parquet(f"{pdir}/synth/as_is.parquet", as_is)
    store.write_parquet(f"{pdir}/synth/reasons.parquet", [{"input_idx": 0, "reason": "It answers in French."}])


def train_jobs(store: Store, tok, ids, broken=()) -> list[TrainJob]:
    jobs = []
    for i, pid in enumerate(ids):
        pdir = store.prompt_dir(pid, "fp0")
        write_synth(store, pdir, tok, seed=i, broken=pid in broken)
        jobs.append(TrainJob(pid, pdir, f"Always answer in French. ({pid})"))
    return jobs
