"""Mixed-adapter continuous batching on the CPU path (genpi.serve.batching via the backend).

Adapters are real PEFT folders (random, non-zero LoRA weights of different ranks, alphas
and targets) published to a real store on the tiny random model; every reply is compared
with the library's own greedy generation alone (HFEngine + PEFT, batch 1).
"""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from genpi.config import load_config
from genpi.serve.adapters import AdapterRef
from genpi.serve.openai import ChatCompletionRequest
from genpi.store import Store

QUESTIONS = ["How do I make a cup of tea?", "Why?", "What is fifteen times twelve, and why is it so?",
             "Any advice for my first job interview at a large company in the city?", "Hi"]
# id -> (r, alpha, target modules, use_rslora, seed): ranks and scalings differ on purpose.
ADAPTERS = {"alpha": (4, 8, "all-linear", False, 1), "beta": (8, 4, ["q_proj", "v_proj"], False, 2),
            "gamma": (2, 16, "all-linear", True, 3)}


def _publish(store: Store, model_dir: Path, model_id: str, r: int, alpha: float, targets, rslora: bool,
             seed: int) -> AdapterRef:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                                           init_lora_weights=False))
    with torch.no_grad():  # large enough to change greedy replies of the tiny model
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.mul_(3.0)
    fp = f"{seed:02d}{r:02d}" + "ab" * 6
    pdir = store.prompt_dir(model_id, fp)
    store.write_json(f"{pdir}/spec.json", {"entry": {"id": model_id, "prompt": f"You are {model_id}."}})
    with tempfile.TemporaryDirectory() as tmp:
        peft.save_pretrained(tmp)
        store.put_dir(tmp, f"{pdir}/adapter")
    store.publish(model_id, fp, {"test": True})
    return AdapterRef(model_id, fp)


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("batching")
    store = Store(root / "store")
    refs = {i: _publish(store, tiny_model_dir, i, *spec) for i, spec in ADAPTERS.items()}
    # Republished "alpha": same id, new weights, new fingerprint.
    refs["alpha2"] = _publish(store, tiny_model_dir, "alpha", 4, 8, "all-linear", False, 7)
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"store={root / 'store'}", "serve.max_new_tokens=64",
                             "serve.max_adapters_per_replica=8"])
    return {"cfg": cfg, "store": store, "refs": refs, "model_dir": tiny_model_dir}


class Reference:
    """The library's own greedy generation, one request at a time (HFEngine + PEFT)."""

    def __init__(self, env):
        from genpi.engines.hf import HFEngine
        from genpi.models import load_model

        self.base, self.tok, _ = load_model(env["cfg"].model)
        self.engine = HFEngine(self.base, self.tok, 1)
        self.model, self.env, self.names = None, env, {}

    def reply(self, ref: AdapterRef | None, q: str, max_tokens: int, strength: float | None = None):
        from peft import PeftModel

        from genpi.engines.base import ChatRequest

        name = None
        if ref is not None:
            if ref.key not in self.names:
                path = f"{self.env['store'].prompt_dir(ref.id, ref.fingerprint)}/adapter"
                name = self.names[ref.key] = f"r{len(self.names)}"
                if self.model is None:
                    self.model = self.engine.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
                else:
                    self.model.load_adapter(path, adapter_name=name)
            name = self.names[ref.key]
        req = ChatRequest([{"role": "user", "content": q}], max_tokens, adapter=name)
        if strength is not None and name is not None:
            from peft.helpers import rescale_adapter_scale

            self.model.set_adapter(name)
            with rescale_adapter_scale(self.model, strength):
                return self.engine.generate([req])[0]
        return self.engine.generate([req])[0]


@pytest.fixture(scope="module")
def reference(env):
    return Reference(env)


def _backend(env, **kw):
    from genpi.serve.backend import AdapterBackend

    return AdapterBackend(env["cfg"], **kw)


def _req(q: str, max_tokens: int, **kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": q}], temperature=0,
                                 max_tokens=max_tokens, **kw)


def _wait_steps(backend, n: int, timeout: float = 30) -> None:
    target = backend.batcher.steps + n
    t0 = time.time()
    while backend.batcher.steps < target and time.time() - t0 < timeout:
        time.sleep(0.001)


def test_mixed_batch_equals_each_reply_alone(env, reference):
    """Three adapters (different ranks, alphas, targets, rsLoRA), the bare base and a
    fractional strength in one batch, arriving at different times, some streamed: every
    reply has the tokens the library generates for that request alone."""
    b = _backend(env)
    refs = env["refs"]
    try:
        handles = {k: b.load(refs[k]) for k in ("alpha", "beta", "gamma")}
        cases = [("alpha", QUESTIONS[0], 40, None), ("beta", QUESTIONS[1], 24, None), (None, QUESTIONS[2], 32, None),
                 ("gamma", QUESTIONS[3], 40, None), ("alpha", QUESTIONS[4], 12, 0.5), ("beta", QUESTIONS[3], 30, None),
                 ("gamma", QUESTIONS[1], 36, 0.0), (None, QUESTIONS[0], 20, None)]
        rows, streamed = [], {}
        for i, (k, q, n, s) in enumerate(cases):
            if i in (2, 5, 7):  # later arrivals join a batch that is already decoding
                _wait_steps(b, 3)
            deltas: list[str] = []
            emit = deltas.append if i % 2 else None
            rows.append(b.submit(_req(q, n, strength=s), handles.get(k), emit))
            streamed[i] = deltas if emit else None
        outs = [r.future.result(timeout=120) for r in rows]
        assert b.batcher.max_rows_seen >= 4, "the requests were never batched together"
        texts = []
        for i, ((k, q, n, s), out) in enumerate(zip(cases, outs)):
            ref = reference.reply(refs[k] if k else None, q, n, s)
            assert out.out == ref.token_ids, (i, k, q)
            assert out.text == ref.text and out.finish == ref.finish_reason
            if streamed[i] is not None:
                assert "".join(streamed[i]) == out.text
            texts.append(out.text)
        # Equality means something only if the adapters, the strength and the base differ.
        same_q = [reference.reply(refs[k] if k else None, QUESTIONS[3], 16, s).text
                  for k, s in [("alpha", None), ("beta", None), ("gamma", None), (None, None), ("alpha", 0.5)]]
        assert len(set(same_q)) == 5, same_q
    finally:
        b.close()


def test_one_at_a_time_mode_gives_the_same_replies(env, reference):
    b = _backend(env, max_batch=1)
    try:
        h = b.load(env["refs"]["beta"])
        rows = [b.submit(_req(q, 16), h) for q in QUESTIONS[:3]]
        outs = [r.future.result(timeout=120) for r in rows]
        assert b.batcher.max_rows_seen == 1
        for q, out in zip(QUESTIONS, outs):
            assert out.out == reference.reply(env["refs"]["beta"], q, 16).token_ids
    finally:
        b.close()


def test_cancelled_row_leaves_the_batch(env, reference):
    from genpi.serve.batching import Cancelled

    b = _backend(env)
    try:
        h = b.load(env["refs"]["alpha"])
        long = b.submit(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": QUESTIONS[3]}],
                                              temperature=1.0, seed=3, max_tokens=64), h)
        other = b.submit(_req(QUESTIONS[2], 32), None)
        _wait_steps(b, 2)
        long.cancel()
        with pytest.raises(Cancelled):
            long.future.result(timeout=60)
        assert len(long.out) < 64
        assert other.future.result(timeout=60).out == reference.reply(None, QUESTIONS[2], 32).token_ids
        assert b.batcher.rows == []
        # A row cancelled before it was admitted never runs.
        first = b.submit(_req(QUESTIONS[0], 8), None)
        queued = b.submit(_req(QUESTIONS[1], 8), None)
        queued.cancel()
        first.future.result(timeout=60)
        with pytest.raises(Cancelled):
            queued.future.result(timeout=60)
        assert queued.out == []
    finally:
        b.close()


def test_seeded_sampling_is_per_request(env):
    """A seeded request samples the same tokens whatever runs beside it, and does not make
    another request's sampling predictable (each row has its own generator)."""
    b = _backend(env)
    try:
        h = b.load(env["refs"]["gamma"])

        def sampled(seed, n=24):
            return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                         temperature=1.0, seed=seed, max_tokens=n)

        alone = b.submit(sampled(11), h).future.result(timeout=60).out
        crowd = [b.submit(sampled(s), hd) for s, hd in ((None, h), (5, None), (11, h), (None, None), (11, h))]
        outs = [r.future.result(timeout=60).out for r in crowd]
        assert outs[2] == alone and outs[4] == alone
        assert b.batcher.max_rows_seen >= 3
        # Unseeded requests after a seeded one are not a replay of each other.
        unseeded = [b.submit(sampled(None), h).future.result(timeout=60).out for _ in range(3)]
        assert len({tuple(u) for u in unseeded}) > 1
    finally:
        b.close()


class _StopRequest(ChatCompletionRequest):
    stop: str | list[str] | None = None


def test_stop_sequences_end_the_reply(env, reference):
    b = _backend(env)
    try:
        full = reference.reply(None, QUESTIONS[0], 32).text
        stop = full[len(full) // 2: len(full) // 2 + 3]
        assert len(stop) == 3 and stop.strip()
        deltas: list[str] = []
        req = _StopRequest(model="m", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0,
                           max_tokens=32, stop=["\x00never", stop])
        out = b.submit(req, None, deltas.append).future.result(timeout=60)
        assert out.text == full[: full.find(stop)] and out.finish == "stop"
        assert "".join(deltas) == out.text
    finally:
        b.close()


def test_lru_slots_and_republish_never_mix_weights(env, reference, tiny_model_dir):
    """Two slots, four adapter keys (alpha republished): least recently used idle slot is
    evicted; a running row keeps its adapter while the new version serves new rows; a row
    whose adapter finds no free slot waits, then gets the right reply."""
    cfg = env["cfg"].with_overrides({"serve": {"max_adapters_per_replica": 2}})
    from genpi.serve.backend import AdapterBackend

    b = AdapterBackend(cfg)
    refs = env["refs"]
    try:
        h = {k: b.load(refs[k]) for k in ("alpha", "alpha2", "beta", "gamma")}
        old = b.submit(_req(QUESTIONS[3], 48), h["alpha"])
        _wait_steps(b, 2)
        new = b.submit(_req(QUESTIONS[3], 8), h["alpha2"])
        late = b.submit(_req(QUESTIONS[1], 8), h["gamma"])  # both slots busy: waits for one
        got = {k: r.future.result(timeout=120).out for k, r in [("alpha", old), ("alpha2", new), ("gamma", late)]}
        assert got["alpha"] == reference.reply(refs["alpha"], QUESTIONS[3], 48).token_ids
        assert got["alpha2"] == reference.reply(refs["alpha2"], QUESTIONS[3], 8).token_ids
        assert got["gamma"] == reference.reply(refs["gamma"], QUESTIONS[1], 8).token_ids
        assert got["alpha"][:8] != got["alpha2"], "the republished adapter must differ"
        assert len(b.attached()) == 2 and refs["gamma"].key in b.attached()
        # LRU: beta evicts the least recently used idle slot; the most recent (gamma) stays.
        b.generate(_req(QUESTIONS[0], 4), h["beta"])
        assert set(b.attached()) == {refs["gamma"].key, refs["beta"].key}
        # A key released by the multiplexer is read again from its files when asked for.
        h["alpha"].release()
        out = b.generate(_req(QUESTIONS[3], 8), h["alpha"])
        assert out.text == reference.reply(refs["alpha"], QUESTIONS[3], 8).text
    finally:
        b.close()
