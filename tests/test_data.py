"""genpi.train.data on the real SmolLM2 chat template, checked token by token."""

from __future__ import annotations

import pytest
import torch

from genpi.train.data import (
    PG_TARGET_TEMPLATE,
    EncodedExample,
    ExampleTooLong,
    collate,
    encode_chat,
    end_of_turn_token,
    pg_messages,
)
from genpi.train.losses import IGNORE_INDEX, token_ce, topk_kl

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

MULTI_TURN = [
    {"role": "system", "content": "Answer like a pirate."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "Arr, 'tis 4, matey!"},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris, ye landlubber.\nHoist the sails!"},
]


@pytest.fixture(scope="module")
def tok(smollm_tokenizer):
    return smollm_tokenizer


@pytest.fixture(scope="module")
def eot(tok) -> int:
    return tok.convert_tokens_to_ids("<|im_end|>")


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def labelled_spans(ex: EncodedExample) -> list[list[int]]:
    """Maximal runs of labelled positions, as lists of positions."""
    spans: list[list[int]] = []
    for t, label in enumerate(ex.labels):
        if label == IGNORE_INDEX:
            continue
        if spans and spans[-1][-1] == t - 1:
            spans[-1].append(t)
        else:
            spans.append([t])
    return spans


def assert_labels_are_inputs(ex: EncodedExample) -> None:
    for t, (token, label) in enumerate(zip(ex.input_ids, ex.labels)):
        assert label in (IGNORE_INDEX, token), f"position {t}: label {label} != input {token}"
    assert ex.n_target_tokens == sum(label != IGNORE_INDEX for label in ex.labels)


def test_end_of_turn_token_is_im_end(tok, eot):
    assert end_of_turn_token(tok) == (eot, "<|im_end|>")


def test_single_turn_labels_only_the_reply_and_end_of_turn(tok, eot):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    ex = encode_chat(tok, messages, max_length=256)
    assert_labels_are_inputs(ex)
    # the template's default system prompt is kept: it is the model's real template
    assert DEFAULT_SYSTEM in tok.decode(ex.input_ids)
    spans = labelled_spans(ex)
    assert len(spans) == 1
    target = [ex.input_ids[t] for t in spans[0]]
    assert target == encode(tok, "Hello! How can I help?") + [eot]
    assert tok.decode(target) == "Hello! How can I help?<|im_end|>"
    # everything before the reply is the rendered prompt, unlabelled, token by token
    prompt = encode(tok, tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True))
    assert ex.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in ex.labels[: len(prompt)])
    assert spans[0][0] == len(prompt)
    # after the end-of-turn only the template's "\n" remains, unlabelled
    assert tok.decode(ex.input_ids[spans[0][-1] + 1 :]) == "\n"
    assert ex.labels[-1] == IGNORE_INDEX
    assert ex.kl_ids is None and ex.kl_logprobs is None and not any(ex.kl_mask)


def test_multi_turn_labels_both_assistant_turns_token_by_token(tok, eot):
    ex = encode_chat(tok, MULTI_TURN, max_length=512)
    assert_labels_are_inputs(ex)
    spans = labelled_spans(ex)
    assert [tok.decode([ex.input_ids[t] for t in span]) for span in spans] == [
        "Arr, 'tis 4, matey!<|im_end|>",
        "Paris, ye landlubber.\nHoist the sails!<|im_end|>",
    ]
    for span, message in zip(spans, (MULTI_TURN[2], MULTI_TURN[4])):
        assert [ex.input_ids[t] for t in span] == encode(tok, message["content"]) + [eot]
    # every unlabelled token, decoded in order, is exactly the template text around the replies
    unlabelled = tok.decode([tok_id for tok_id, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX])
    assert unlabelled == (
        "<|im_start|>system\nAnswer like a pirate.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
        "\n<|im_start|>user\nAnd the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        "\n"
    )
    # a system prompt given: no default one injected
    assert DEFAULT_SYSTEM not in tok.decode(ex.input_ids)
    assert ex.n_target_tokens == sum(len(span) for span in spans)


def test_last_assistant_labels_only_the_final_turn(tok):
    every = encode_chat(tok, MULTI_TURN, max_length=512)
    last = encode_chat(tok, MULTI_TURN, max_length=512, train_on="last_assistant")
    assert last.input_ids == every.input_ids
    spans = labelled_spans(last)
    assert len(spans) == 1 and spans[0] == labelled_spans(every)[1]
    with pytest.raises(ValueError, match="train_on"):
        encode_chat(tok, MULTI_TURN, max_length=512, train_on="all")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "messages",
    [
        MULTI_TURN,
        MULTI_TURN[1:],  # default system prompt injected
        [
            {"role": "user", "content": "Écris un haïku 🌸 sur la mer.\n\n  Indented line\tand tab"},
            {"role": "assistant", "content": "Vagues d'écume —\n{\"json\": [1, 2]}\n```python\nprint('x')\n```  "},
        ],
        [
            {"role": "system", "content": ""},
            {"role": "user", "content": "<|im_start|> is a literal here?"},
            {"role": "assistant", "content": "trailing newlines and spaces \n\n  "},
            {"role": "user", "content": "ok"},
            {"role": "assistant", "content": "x"},
        ],
    ],
    ids=["system-multi-turn", "default-system", "unicode-code-whitespace", "edge-whitespace"],
)
def test_pieces_concatenate_to_the_whole_conversation_tokenisation(tok, messages):
    ex = encode_chat(tok, messages, max_length=1024)
    whole = encode(tok, tok.apply_chat_template(messages, tokenize=False))
    assert ex.input_ids == whole
    assert_labels_are_inputs(ex)


def test_reply_with_leading_whitespace_is_tokenised_as_generated(tok, eot):
    """A reply that starts with whitespace is where the pieces and the whole string
    differ: tokenising the whole conversation merges the template's "\n" with the
    reply's leading spaces ("\n " + " V..."). The encoding keeps the generation-time
    split instead -- the prompt ends at "assistant\n" and the reply is its own
    tokens -- because that is what the model sees and must produce when it answers."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Vagues\n\nleading"}]
    ex = encode_chat(tok, messages, max_length=256)
    prompt = encode(tok, tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True))
    assert ex.input_ids[: len(prompt)] == prompt
    (span,) = labelled_spans(ex)
    assert span[0] == len(prompt)
    assert [ex.input_ids[t] for t in span] == encode(tok, messages[1]["content"]) + [eot]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)


def test_messages_after_the_last_assistant_turn_are_dropped(tok):
    with_tail = MULTI_TURN + [{"role": "user", "content": "[END_CONVERSATION]"}]
    assert encode_chat(tok, with_tail, max_length=512).input_ids == encode_chat(tok, MULTI_TURN, 512).input_ids


def _generated(tok, eot, pieces: list[str], stop: bool = True) -> list[int]:
    ids = [i for piece in pieces for i in encode(tok, piece)]
    return ids + [eot] if stop else ids


def _topk_rows(token_ids: list[int]) -> tuple[list[list[int]], list[list[float]]]:
    # a distinct, recognisable row per generated token; ragged (k = 2 or 3) like vLLM's
    ids = [[t, 100 + j] + ([200 + j] if j % 2 else []) for j, t in enumerate(token_ids)]
    lps = [[-0.1, -2.5] + ([-4.0] if j % 2 else []) for j in range(len(token_ids))]
    return ids, lps


def test_given_token_ids_are_used_verbatim_and_kl_rows_align(tok, eot):
    # "Hello" split as "Hel" + "lo": not how the tokenizer would encode the text, so
    # seeing these ids proves the teacher's own tokens are used, not a re-tokenisation.
    generated = _generated(tok, eot, ["Hel", "lo", " world", "!"])
    assert generated[:-1] != encode(tok, "Hello world!")
    topk_ids, topk_lps = _topk_rows(generated)
    messages = [
        {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": "Hello world!", "token_ids": generated,
         "topk_ids": topk_ids, "topk_logprobs": topk_lps},
    ]
    ex = encode_chat(tok, messages, max_length=256)
    assert_labels_are_inputs(ex)
    (span,) = labelled_spans(ex)
    assert [ex.input_ids[t] for t in span] == generated
    assert [t for t, on in enumerate(ex.kl_mask) if on] == span
    assert ex.kl_ids is not None and ex.kl_logprobs is not None
    for j, t in enumerate(span):
        assert ex.kl_ids[t] == topk_ids[j] and ex.kl_logprobs[t] == pytest.approx(topk_lps[j])
        assert ex.kl_ids[t][0] == ex.input_ids[t]  # row t describes the token AT t
    assert all(ex.kl_ids[t] == [] for t, on in enumerate(ex.kl_mask) if not on)
    assert len(ex.kl_ids) == len(ex.kl_logprobs) == len(ex.kl_mask) == len(ex.input_ids)


def test_truncated_generation_gets_an_unlabelled_end_of_turn(tok, eot):
    generated = _generated(tok, eot, ["Once upon a time"], stop=False)
    topk_ids, topk_lps = _topk_rows(generated)
    messages = [
        {"role": "user", "content": "Tell a story"},
        {"role": "assistant", "content": "Once upon a time", "token_ids": generated,
         "topk_ids": topk_ids, "topk_logprobs": topk_lps},
    ]
    ex = encode_chat(tok, messages, max_length=256)
    (span,) = labelled_spans(ex)
    assert [ex.input_ids[t] for t in span] == generated
    after = span[-1] + 1
    assert ex.input_ids[after] == eot and ex.labels[after] == IGNORE_INDEX and not ex.kl_mask[after]
    # the sequence still follows the template
    assert ex.input_ids == encode(tok, tok.apply_chat_template(messages, tokenize=False))


def test_kl_rows_only_on_trained_turns(tok, eot):
    first = _generated(tok, eot, ["Arr, 'tis 4, matey!"])
    second = _generated(tok, eot, ["Paris, ye landlubber.\nHoist the sails!"])
    messages = [dict(m) for m in MULTI_TURN]
    for index, ids in ((2, first), (4, second)):
        rows = _topk_rows(ids)
        messages[index].update(token_ids=ids, topk_ids=rows[0], topk_logprobs=rows[1])
    every = encode_chat(tok, messages, max_length=512)
    assert sum(every.kl_mask) == len(first) + len(second)
    last = encode_chat(tok, messages, max_length=512, train_on="last_assistant")
    assert sum(last.kl_mask) == len(second)
    assert [t for t, on in enumerate(last.kl_mask) if on] == labelled_spans(last)[0]


def test_token_ids_that_do_not_match_the_content_are_rejected(tok, eot):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "token_ids": _generated(tok, eot, ["Goodbye"])},
    ]
    with pytest.raises(ValueError, match="token_ids decode to"):
        encode_chat(tok, messages, max_length=256)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([{"role": "user", "content": "no reply"}], "no assistant turn"),
        ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "role must be"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], "content must be a str"),
        ([{"role": "user", "content": "x"},
          {"role": "assistant", "content": "y", "token_ids": [1, 2], "topk_ids": [[1]], "topk_logprobs": [[0.0]]}],
         "must match one to one"),
        ([{"role": "user", "content": "x"},
          {"role": "assistant", "content": "y", "token_ids": [1], "topk_ids": [[1]]}], "both topk_ids"),
        ([{"role": "user", "content": "x"},
          {"role": "assistant", "content": "y", "token_ids": [1], "topk_ids": [[]], "topk_logprobs": [[]]}],
         "non-empty"),
        ([{"role": "user", "content": "x", "token_ids": [1]}, {"role": "assistant", "content": "y"}],
         "only assistant"),
    ],
)
def test_invalid_conversations_are_rejected(tok, bad, match):
    with pytest.raises(ValueError, match=match):
        encode_chat(tok, bad, max_length=256)


def test_too_long_raises_with_both_lengths_and_never_truncates(tok):
    n = len(encode_chat(tok, MULTI_TURN, max_length=10_000))
    assert len(encode_chat(tok, MULTI_TURN, max_length=n)) == n  # exactly at the limit is fine
    with pytest.raises(ExampleTooLong) as info:
        encode_chat(tok, MULTI_TURN, max_length=n - 1)
    assert isinstance(info.value, ValueError)
    assert (info.value.n_tokens, info.value.max_length) == (n, n - 1)
    assert str(n) in str(info.value) and str(n - 1) in str(info.value)
    assert "not truncated" in str(info.value)


# --- collate ----------------------------------------------------------------------


def test_collate_pads_right_and_omits_kl_when_absent(tok):
    short = encode_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}], 256)
    long = encode_chat(tok, MULTI_TURN, 512)
    pad = tok.pad_token_id
    batch = collate([short, long], pad_id=pad)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    b, t = batch["input_ids"].shape
    assert (b, t) == (2, len(long))
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["input_ids"][0, : len(short)].tolist() == short.input_ids
    assert batch["input_ids"][0, len(short) :].eq(pad).all()
    assert batch["attention_mask"][0].tolist() == [1] * len(short) + [0] * (t - len(short))
    assert batch["attention_mask"][1].eq(1).all()
    assert batch["labels"][0, : len(short)].tolist() == short.labels
    assert batch["labels"][0, len(short) :].eq(IGNORE_INDEX).all()
    assert batch["labels"][1].tolist() == long.labels


def test_collate_kl_tensors_pad_rows_with_minus_inf(tok, eot):
    generated = _generated(tok, eot, ["Hello", " world"])
    topk_ids, topk_lps = _topk_rows(generated)  # rows of 2 and 3
    with_kl = encode_chat(
        tok,
        [{"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello world", "token_ids": generated,
          "topk_ids": topk_ids, "topk_logprobs": topk_lps}],
        256,
    )
    without = encode_chat(tok, MULTI_TURN, 512)
    batch = collate([with_kl, without], pad_id=tok.pad_token_id)
    t = len(without)
    assert batch["kl_ids"].shape == (2, t, 3) and batch["kl_ids"].dtype == torch.int64
    assert batch["kl_logprobs"].shape == (2, t, 3) and batch["kl_logprobs"].dtype == torch.float32
    assert batch["kl_mask"].shape == (2, t) and batch["kl_mask"].dtype == torch.bool
    assert batch["kl_mask"][0, : len(with_kl)].tolist() == with_kl.kl_mask
    assert not batch["kl_mask"][0, len(with_kl) :].any() and not batch["kl_mask"][1].any()
    positions = [i for i, on in enumerate(with_kl.kl_mask) if on]
    for j, pos in enumerate(positions):
        row = topk_ids[j]
        assert batch["kl_ids"][0, pos, : len(row)].tolist() == row
        assert batch["kl_logprobs"][0, pos, : len(row)].tolist() == pytest.approx(topk_lps[j])
        assert torch.isneginf(batch["kl_logprobs"][0, pos, len(row) :]).all()
    assert torch.isneginf(batch["kl_logprobs"][1]).all()
    with pytest.raises(ValueError):
        collate([], pad_id=0)


# --- end to end: data alignment == loss alignment ---------------------------------------


def test_teacher_rows_from_encoded_data_give_zero_kl_for_the_same_model(tok, eot, tiny_llama):
    """Top-k rows recorded the way an engine records them (the distribution each
    generated token was drawn from) give KL 0 for the same model and > 0 for
    another: encode_chat's row alignment and topk_kl's shift agree."""
    # a wider init than the default 0.02 so the random models are not near-uniform
    teacher = tiny_llama(vocab_size=len(tok), initializer_range=0.2)
    other = tiny_llama(vocab_size=len(tok), seed=1, initializer_range=0.2)
    generated = _generated(tok, eot, ["Paris, ye landlubber."])
    messages = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris, ye landlubber.", "token_ids": generated},
    ]
    plain = encode_chat(tok, messages, max_length=256)
    (span,) = labelled_spans(plain)
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=torch.tensor([plain.input_ids])).logits[0], -1)
    # the token at position t was drawn from the distribution at t - 1
    top = [logp[t - 1].topk(5) for t in span]
    messages[1]["topk_ids"] = [v.indices.tolist() for v in top]
    messages[1]["topk_logprobs"] = [v.values.tolist() for v in top]
    batch = collate([encode_chat(tok, messages, max_length=256), plain], pad_id=tok.pad_token_id)

    def kl(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return topk_kl(logits, batch["kl_ids"], batch["kl_logprobs"], batch["kl_mask"])

    with torch.no_grad():
        same_sum, same_n = kl(teacher)
        other_sum, _ = kl(other)
    assert same_n.tolist() == [len(generated), 0]
    assert same_sum.abs().max().item() < 1e-5
    assert other_sum[0].item() > 1e-3

    # and the SFT loss on the collated batch is finite with gradients through the model
    logits = other(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss_sum, n = token_ce(logits, batch["labels"])
    assert n.tolist() == [len(generated), plain.n_target_tokens]
    (loss_sum.sum() / n.sum()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in other.parameters())


# --- prompt generation ------------------------------------------------------------


def test_pg_messages_layout():
    messages = pg_messages(
        input_text="Translate {this}: hello",
        as_is="hello",
        to_be="bonjour",
        prompt_text="Always answer in French. Use {braces} verbatim.",
        reason="The instructions ask for French.",
    )
    assert messages is not None and [m["role"] for m in messages] == ["user", "assistant"]
    user = messages[0]["content"]
    for piece in ("Input:\nTranslate {this}: hello", "AS-IS reply:\nhello", "TO-BE reply:\nbonjour"):
        assert piece in user
    assert user.index("AS-IS") < user.index("TO-BE")
    assert messages[1]["content"] == (
        "Instructions:\nAlways answer in French. Use {braces} verbatim.\n\n"
        "Why the output changes:\nThe instructions ask for French."
    )
    assert PG_TARGET_TEMPLATE.startswith("Instructions:\n{prompt}")


def test_pg_messages_off_custom_template_and_no_reason():
    assert pg_messages("x", "a", "b", prompt_text=None, reason="r") is None
    messages = pg_messages("x", "a {to_be}", "b", "P", None, template="I={input} S={as_is} T={to_be}")
    assert messages == [
        {"role": "user", "content": "I=x S=a {to_be} T=b"},  # values are never re-filled
        {"role": "assistant", "content": "Instructions:\nP"},
    ]
    with pytest.raises(ValueError, match="as_is"):
        pg_messages("x", "a", "b", "P", "r", template="{input} {to_be}")


def test_pg_example_keeps_a_long_prompt_whole(tok, eot):
    prompt = " ".join(f"Rule {i}: never reply with the word number {i}." for i in range(150))
    messages = pg_messages("What is 1+1?", "2", "Two.", prompt, "The rules forbid digits.")
    assert messages is not None
    ex = encode_chat(tok, messages, max_length=8192)
    assert ex.n_target_tokens > 1000  # longer than GenPI's 512-token cut
    (span,) = labelled_spans(ex)
    assert tok.decode([ex.input_ids[t] for t in span]) == messages[1]["content"] + "<|im_end|>"
    with pytest.raises(ExampleTooLong):
        encode_chat(tok, messages, max_length=512)
