"""How the transformers engine cuts requests into decoding batches, and what follows from it:
at most engine.batch_size rows and engine.max_batch_tokens tokens per batch (the KV cache of a
long prompt at batch 128 would not fit a small machine); the inputs pass does not follow the
engine batch above INPUT_CALLS_UNIT; the evaluation's KL, computed from the reply positions'
logits only, is the full-vocabulary divergence on the teacher's reply tokens."""
from __future__ import annotations

import pytest
import torch

from genpi.chat import student_messages, teacher_messages
from genpi.config import SynthConfig, load_config
from genpi.engines.base import ChatRequest, render_chat
from genpi.engines.hf import HFEngine
from genpi.synth.stages import INPUT_CALLS_UNIT, inputs_stage
from test_input_diversity import FRENCH, ListEngine

QUESTIONS = ["hi", "How do I boil an egg?", "Name three rivers in Europe and say which is longest.",
             "Write a short poem about tea, the rain and an old cat sleeping by the window, please.", "Why?",
             "What is the capital of France?", "Explain photosynthesis to a child in two sentences."]


class RecordingEngine(HFEngine):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.batches: list[tuple[int, int, int]] = []  # (rows, widest prompt, most new tokens)

    def _generate_batch(self, reqs, ids):
        self.batches.append((len(ids), max(map(len, ids)), max(r.max_new_tokens for r in reqs)))
        return super()._generate_batch(reqs, ids)


def _requests(n_new):
    return [ChatRequest(student_messages(q), n) for q, n in zip(QUESTIONS * 2, n_new * 7)]


def test_batches_hold_at_most_batch_size_rows_and_max_batch_tokens(tiny_llama, smollm_tokenizer):
    model = tiny_llama(vocab_size=len(smollm_tokenizer), seed=2)
    reqs = _requests([3, 1, 5, 2])
    widths = sorted(len(render_chat(smollm_tokenizer, r.messages)) for r in reqs)
    budget = 3 * (widths[-1] + 5)  # about three rows of the longest
    eng = RecordingEngine(model, smollm_tokenizer, batch_size=4, max_batch_tokens=budget)
    outs = eng.generate(reqs)
    assert [len(o.token_ids) <= r.max_new_tokens for o, r in zip(outs, reqs)] == [True] * len(reqs)
    assert sum(b[0] for b in eng.batches) == len(reqs)
    assert all(rows <= 4 and rows * (width + new) <= budget for rows, width, new in eng.batches), eng.batches
    assert any(rows == 4 for rows, _, _ in eng.batches) and any(rows < 4 for rows, _, _ in eng.batches)
    # Without the token budget: batch_size rows at a time, whatever their length.
    plain = RecordingEngine(model, smollm_tokenizer, batch_size=4)
    plain.generate(reqs)
    assert [b[0] for b in plain.batches] == [4, 4, 4, 2]
    # A single row over the budget still runs (alone): the budget cuts batches, never requests.
    tight = RecordingEngine(model, smollm_tokenizer, batch_size=4, max_batch_tokens=8)
    assert len(tight.generate(reqs[:3])) == 3 and [b[0] for b in tight.batches] == [1, 1, 1]


def test_the_default_engine_settings_and_the_engine_built_from_them(tiny_llama, smollm_tokenizer):
    cfg = load_config(None, [])
    assert cfg.engine.batch_size == 128 and cfg.engine.max_batch_tokens == 32768
    with pytest.raises(Exception, match="max_batch_tokens"):
        load_config(None, ["engine.max_batch_tokens=0"])
    # The pipeline, the evaluation and bench/quality.py build their engine from the config.
    small = load_config(None, ["engine.batch_size=3", "engine.max_batch_tokens=500"])
    eng = HFEngine.for_model(tiny_llama(vocab_size=len(smollm_tokenizer)), smollm_tokenizer, small)
    assert (eng.batch_size, eng.max_batch_tokens) == (3, 500)


@pytest.mark.parametrize("batch", [64, 128])
def test_the_inputs_pass_does_not_follow_an_engine_batch_above_its_unit(batch):
    """Whole engine batches of 128 calls made the French inputs pass 3.5x longer for candidates
    it did not need: above INPUT_CALLS_UNIT the pass is the one it is at that batch."""
    def run(engine_batch):
        eng = ListEngine()
        eng.batch_size = engine_batch
        rows = [{"prompt_id": "fr", "prompt": FRENCH["prompt"], "seeds": FRENCH["seed_inputs"][:2],
                 "synth": SynthConfig(seed=1, n_train_inputs=80, n_heldout_inputs=16).model_dump()}]
        return inputs_stage(eng, rows), eng.lists

    out, lists = run(batch)
    ref_out, ref_lists = run(INPUT_CALLS_UNIT)
    assert len(lists) % INPUT_CALLS_UNIT == 0 and len(lists) < batch
    assert [r.seed for r in lists] == [r.seed for r in ref_lists] and out == ref_out
    # Below the unit, calls are still rounded to whole engine batches (tests run batch 4).
    _, small = run(4)
    assert len(small) % 4 == 0 and len(small) < len(ref_lists)


def test_the_eval_kl_is_the_full_vocabulary_divergence_on_the_teachers_reply_tokens(tiny_llama, smollm_tokenizer):
    """Independently of the eval's batching and its logits_to_keep window: one unpadded forward
    per conversation, the log-softmax of every position that predicts a reply token."""
    from genpi.eval.run import _kl

    tok = smollm_tokenizer
    teacher_model, student_model = tiny_llama(vocab_size=len(tok), seed=3), tiny_llama(vocab_size=len(tok), seed=4)

    class Pair(torch.nn.Module):
        """A model whose 'adapter' is another model: the shape of PEFT's API that _kl uses."""

        def __init__(self):
            super().__init__()
            self.active, self.t, self.s = "t", teacher_model, student_model

        def forward(self, **kw):
            return (self.t if self.active == "t" else self.s)(**kw)

        def disable_adapter(self):
            import contextlib

            @contextlib.contextmanager
            def ctx():
                before, self.active = self.active, "t"
                yield
                self.active = before
            return ctx()

        def set_adapter(self, name):
            self.active = "s"

    prompt = "Always answer in French, briefly."
    end = tok.convert_tokens_to_ids("<|im_end|>")
    replies = [tok.encode(" Bonjour" * k, add_special_tokens=False) + [end] for k in (1, 4, 2, 7, 3)]
    qs = QUESTIONS[:5]
    t_conv = [[*teacher_messages(prompt, q), {"role": "assistant", "content": tok.decode(r[:-1]), "token_ids": r}]
              for q, r in zip(qs, replies)]
    s_conv = [[*student_messages(q), t[-1]] for q, t in zip(qs, t_conv)]

    def reply_logprobs(model, msgs, reply):
        ids = render_chat(tok, msgs) + reply
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        return lp[len(ids) - len(reply) - 1 : len(ids) - 1]

    kl_base = kl_adapter = 0.0
    for q, r in zip(qs, replies):
        t = reply_logprobs(teacher_model, teacher_messages(prompt, q), r)
        kl_base += float((t.exp() * (t - reply_logprobs(teacher_model, student_messages(q), r))).sum())
        kl_adapter += float((t.exp() * (t - reply_logprobs(student_model, student_messages(q), r))).sum())
    n = sum(map(len, replies))
    got_n, got_base, got_adapter = _kl(Pair(), tok, t_conv, s_conv, ["s"], bs=2)
    assert got_n == n
    assert got_base == pytest.approx(kl_base / n, rel=1e-4) and got_adapter["s"] == pytest.approx(kl_adapter / n, rel=1e-4)
    assert got_adapter["s"] > got_base > 0
