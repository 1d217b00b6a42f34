"""genpi.train.losses against hand-computed values on tiny tensors.

Convention under test: labels / teacher rows / masks are aligned with input_ids
and logits[:, t - 1] predicts position t.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genpi.train.losses import (
    IGNORE_INDEX,
    full_kl,
    joint_loss,
    mean_full_kl,
    mean_token_ce,
    mean_topk_kl,
    token_ce,
    token_scale,
    topk_kl,
)

# A V=4 row whose softmax is exactly [0.1, 0.2, 0.3, 0.4].
Q = [0.1, 0.2, 0.3, 0.4]
ROW_Q = [math.log(q) for q in Q]
ROW_UNIFORM = [0.0, 0.0, 0.0, 0.0]  # softmax [0.25] * 4


def logits_of(*rows: list[float]) -> torch.Tensor:
    """[1, len(rows), 4] logits from explicit rows."""
    return torch.tensor([list(rows)], dtype=torch.float32)


# --- token_ce ---------------------------------------------------------------------


def test_token_ce_hand_computed_and_shifted():
    # positions 0..2; logits at t-1 predict the label at t. Last logits row predicts nothing.
    logits = logits_of(ROW_Q, ROW_UNIFORM, [5.0, -3.0, 1.0, 0.0])
    labels = torch.tensor([[IGNORE_INDEX, 2, 3]])
    loss_sum, n = token_ce(logits, labels)
    expected = -math.log(0.3) - math.log(0.25)
    assert n.tolist() == [2]
    assert loss_sum.item() == pytest.approx(expected, abs=1e-6)
    assert mean_token_ce(logits, labels).item() == pytest.approx(expected / 2, abs=1e-6)

    # the label at position 0 has no prediction and is ignored whatever it is
    labels0 = torch.tensor([[1, 2, IGNORE_INDEX]])
    loss_sum, n = token_ce(logits, labels0)
    assert n.tolist() == [1]
    assert loss_sum.item() == pytest.approx(-math.log(0.3), abs=1e-6)


def test_token_ce_per_sequence_sums_and_counts():
    logits = torch.tensor([[ROW_Q, ROW_UNIFORM, ROW_Q], [ROW_UNIFORM, ROW_Q, ROW_Q]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1], [IGNORE_INDEX, IGNORE_INDEX, 3]])
    loss_sum, n = token_ce(logits, labels)
    assert n.tolist() == [2, 1]
    assert loss_sum[0].item() == pytest.approx(-math.log(0.1) - math.log(0.25), abs=1e-6)
    assert loss_sum[1].item() == pytest.approx(-math.log(0.4), abs=1e-6)
    # the batch mean is per token, not per sequence
    total = -math.log(0.1) - math.log(0.25) - math.log(0.4)
    assert mean_token_ce(logits, labels).item() == pytest.approx(total / 3, abs=1e-6)


def test_token_ce_ignores_garbage_at_unlabelled_positions():
    logits = logits_of(ROW_Q, [float("nan")] * 4, [float("inf")] * 4)
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX]])
    loss_sum, n = token_ce(logits, labels)
    assert loss_sum.item() == pytest.approx(-math.log(0.3), abs=1e-6)


def test_token_ce_empty_is_zero_not_nan_and_backward_works():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss_sum, n = token_ce(logits, labels)
    assert n.tolist() == [0, 0] and loss_sum.tolist() == [0.0, 0.0]
    mean = mean_token_ce(logits, labels)
    assert mean.item() == 0.0
    mean.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_token_ce_matches_torch_reference_and_bf16():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, 2] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="mean")
    assert mean_token_ce(logits, labels).item() == pytest.approx(ref.item(), abs=1e-5)
    # bf16 logits: the math is float32 on the bf16 values
    lb = logits.bfloat16()
    ref_bf = F.cross_entropy(lb.float()[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert mean_token_ce(lb, labels).dtype == torch.float32
    assert mean_token_ce(lb, labels).item() == pytest.approx(ref_bf.item(), abs=1e-5)


def test_token_ce_gradient_is_softmax_minus_onehot():
    logits = logits_of(ROW_Q, ROW_UNIFORM).requires_grad_(True)
    labels = torch.tensor([[IGNORE_INDEX, 2]])
    token_ce(logits, labels)[0].sum().backward()
    assert torch.allclose(logits.grad[0, 0], torch.tensor([0.1, 0.2, 0.3 - 1.0, 0.4]), atol=1e-6)
    assert torch.equal(logits.grad[0, 1], torch.zeros(4))  # last row predicts nothing


# --- topk_kl ----------------------------------------------------------------------


def kl_inputs(rows_ids, rows_lps, k):
    """Teacher tensors for a [1, 2] sequence whose position 1 carries the row."""
    ids = torch.zeros(1, 2, k, dtype=torch.long)
    lps = torch.full((1, 2, k), float("-inf"))
    ids[0, 1, : len(rows_ids)] = torch.tensor(rows_ids)
    lps[0, 1, : len(rows_lps)] = torch.tensor(rows_lps)
    mask = torch.tensor([[False, True]])
    return ids, lps, mask


def test_topk_kl_hand_computed_with_tail_bucket():
    # student q = [0.1, 0.2, 0.3, 0.4]; teacher top-2 = {3: 0.5, 0: 0.3}, so p_tail = 0.2
    # and the student's tail (tokens 1, 2) is q_tail = 0.2 + 0.3 = 0.5.
    logits = logits_of(ROW_Q, ROW_UNIFORM)
    ids, lps, mask = kl_inputs([3, 0], [math.log(0.5), math.log(0.3)], k=2)
    kl_sum, n = topk_kl(logits, ids, lps, mask)
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.5)
    assert n.tolist() == [1]
    assert kl_sum.item() == pytest.approx(expected, abs=1e-6)


def test_topk_kl_padded_slots_count_as_zero_probability():
    logits = logits_of(ROW_Q, ROW_UNIFORM)
    ids, lps, mask = kl_inputs([3, 0], [math.log(0.5), math.log(0.3)], k=4)  # two -inf slots, ids 0
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.5)
    assert topk_kl(logits, ids, lps, mask)[0].item() == pytest.approx(expected, abs=1e-6)
    # the padding id (0) must not be removed from the tail: pad with id 0 when 0 is NOT in the top-k
    ids, lps, mask = kl_inputs([3, 2], [math.log(0.5), math.log(0.3)], k=3)
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.3) + 0.2 * math.log(0.2 / 0.3)
    assert topk_kl(logits, ids, lps, mask)[0].item() == pytest.approx(expected, abs=1e-6)


def test_topk_kl_no_tail_term_when_teacher_mass_is_all_in_topk():
    # teacher {1: 0.6, 2: 0.4}: p_tail = 0, the tail term vanishes (no 0 * log 0 NaN)
    logits = logits_of(ROW_Q, ROW_UNIFORM).requires_grad_(True)
    ids, lps, mask = kl_inputs([1, 2], [math.log(0.6), math.log(0.4)], k=2)
    kl_sum, _ = topk_kl(logits, ids, lps, mask)
    expected = 0.6 * math.log(0.6 / 0.2) + 0.4 * math.log(0.4 / 0.3)
    assert kl_sum.item() == pytest.approx(expected, abs=1e-6)
    kl_sum.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_topk_kl_whole_vocabulary_equals_full_kl_and_has_finite_grads():
    # K = V: no tail at all (student tail is empty); must equal the full KL, NaN-free.
    p = [0.25, 0.25, 0.4, 0.1]
    logits = logits_of(ROW_Q, ROW_UNIFORM).requires_grad_(True)
    ids, lps, mask = kl_inputs([2, 0, 1, 3], [math.log(p[i]) for i in (2, 0, 1, 3)], k=4)
    kl_sum, _ = topk_kl(logits, ids, lps, mask)
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, Q))
    assert kl_sum.item() == pytest.approx(expected, abs=1e-6)
    kl_sum.sum().backward()
    # d KL / d logits = q - p on the predicting row
    assert torch.allclose(logits.grad[0, 0], torch.tensor(Q) - torch.tensor(p), atol=1e-6)


def test_topk_kl_gradient_matches_analytic_form():
    # grad = q_v - p_v on top-k tokens, q_v (1 - p_tail / q_tail) on tail tokens
    logits = logits_of(ROW_Q, ROW_UNIFORM).requires_grad_(True)
    ids, lps, mask = kl_inputs([3, 0], [math.log(0.5), math.log(0.3)], k=2)
    topk_kl(logits, ids, lps, mask)[0].sum().backward()
    expected = torch.tensor([0.1 - 0.3, 0.2 * (1 - 0.2 / 0.5), 0.3 * (1 - 0.2 / 0.5), 0.4 - 0.5])
    assert torch.allclose(logits.grad[0, 0], expected, atol=1e-6)
    assert torch.equal(logits.grad[0, 1], torch.zeros(4))


def _teacher_topk(source_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the distribution of the token AT t, i.e. from source_logits[:, t - 1]."""
    logp = torch.log_softmax(source_logits.float(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    # shift right by one: row t describes token t, predicted at t - 1
    b, t, _ = logp.shape
    shifted_ids = torch.zeros(b, t, k, dtype=torch.long)
    shifted_lps = torch.full((b, t, k), float("-inf"))
    shifted_ids[:, 1:] = ids[:, :-1]
    shifted_lps[:, 1:] = values[:, :-1]
    return shifted_ids, shifted_lps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_kl_is_zero_when_student_equals_teacher_source(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 50) * 3).to(dtype)
    ids, lps = _teacher_topk(logits, k=5)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 4:] = False
    kl_sum, n = topk_kl(logits, ids, lps, mask)
    assert n.tolist() == [6, 3, 6]
    assert kl_sum.dtype == torch.float32
    assert kl_sum.abs().max().item() < 1e-6
    # and strictly positive once the student differs
    other = logits.float() + torch.randn(3, 7, 50)
    assert (topk_kl(other, ids, lps, mask)[0] > 1e-3).all()


def test_topk_kl_never_exceeds_full_kl():
    # Bucketing the tail is a coarsening of the distribution, so it can only lower the KL.
    torch.manual_seed(1)
    teacher = torch.randn(2, 9, 30) * 2
    student = torch.randn(2, 9, 30) * 2
    mask = torch.ones(2, 9, dtype=torch.bool)
    full_sum, _ = full_kl(student, teacher, mask)
    previous = torch.zeros(2)
    for k in (1, 3, 10, 30):
        ids, lps = _teacher_topk(teacher, k)
        kl_sum, _ = topk_kl(student, ids, lps, mask)
        assert (kl_sum <= full_sum + 1e-5).all()
        assert (kl_sum >= previous - 1e-5).all()  # more teacher tokens, finer buckets, more KL
        previous = kl_sum
    assert torch.allclose(previous, full_sum, atol=1e-5)  # k = V is the full KL


def test_topk_kl_masking_and_per_sequence_sums():
    logits = torch.tensor([[ROW_Q, ROW_UNIFORM, ROW_Q], [ROW_UNIFORM, ROW_Q, ROW_UNIFORM]])
    ids = torch.zeros(2, 3, 2, dtype=torch.long)
    lps = torch.full((2, 3, 2), float("-inf"))
    # seq 0, pos 1 (predicted by ROW_Q): teacher {3: 0.5, 0: 0.3}
    ids[0, 1] = torch.tensor([3, 0])
    lps[0, 1] = torch.tensor([math.log(0.5), math.log(0.3)])
    # seq 1, pos 2 (predicted by ROW_Q): teacher {2: 1.0}
    ids[1, 2] = torch.tensor([2, 0])
    lps[1, 2] = torch.tensor([0.0, float("-inf")])
    # garbage at unmasked positions must not matter: out-of-vocabulary ids, NaN logprobs
    ids[0, 2] = torch.tensor([10**6, -5])
    lps[0, 2] = torch.tensor([float("nan"), 3.0])
    mask = torch.tensor([[False, True, False], [False, False, True]])
    kl_sum, n = topk_kl(logits, ids, lps, mask)
    assert n.tolist() == [1, 1]
    seq0 = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.5)
    seq1 = 1.0 * math.log(1.0 / 0.3)
    assert kl_sum[0].item() == pytest.approx(seq0, abs=1e-6)
    assert kl_sum[1].item() == pytest.approx(seq1, abs=1e-6)
    assert mean_topk_kl(logits, ids, lps, mask).item() == pytest.approx((seq0 + seq1) / 2, abs=1e-6)


def test_topk_kl_empty_mask_is_zero_not_nan():
    logits = torch.randn(2, 4, 6, requires_grad=True)
    ids = torch.zeros(2, 4, 3, dtype=torch.long)
    lps = torch.zeros(2, 4, 3)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    kl_sum, n = topk_kl(logits, ids, lps, mask)
    assert kl_sum.tolist() == [0.0, 0.0] and n.tolist() == [0, 0]
    mean = mean_topk_kl(logits, ids, lps, mask)
    assert mean.item() == 0.0
    mean.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_topk_kl_gradients_flow_through_a_model(tiny_llama):
    model = tiny_llama(vocab_size=64)
    teacher = tiny_llama(vocab_size=64, seed=1)
    input_ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids, lps = _teacher_topk(teacher(input_ids=input_ids).logits, k=8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    labels = input_ids.clone()
    logits = model(input_ids=input_ids).logits
    (kl_sum, kl_n), (ce_sum, ce_n) = topk_kl(logits, ids, lps, mask), token_ce(logits, labels)
    sums = torch.stack([ce_sum.sum(), torch.zeros(()), kl_sum.sum()])[None]  # [1, (sft, pg, kl)]
    counts = torch.stack([ce_n.sum(), torch.zeros((), dtype=torch.long), kl_n.sum()])[None]
    total, means = joint_loss(sums, counts, (0.5, 0.0, 1.0))
    total.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert means[0, 2].item() > 0 and counts[0, 0].item() == 18


def test_topk_kl_rejects_bad_shapes():
    logits = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="teacher_ids"):
        topk_kl(logits, torch.zeros(1, 3, 2, dtype=torch.long), torch.zeros(1, 3, 3), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        topk_kl(logits, torch.zeros(1, 3, 2, dtype=torch.long), torch.zeros(1, 3, 2), torch.ones(1, 4, dtype=torch.bool))


# --- full_kl ----------------------------------------------------------------------


def test_full_kl_matches_torch_kl_div():
    torch.manual_seed(2)
    student = torch.randn(2, 6, 13)
    teacher = torch.randn(2, 6, 13) * 2
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    kl_sum, n = full_kl(student, teacher, mask)
    ref = F.kl_div(
        torch.log_softmax(student[:, :-1], -1),
        torch.log_softmax(teacher[:, :-1], -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    ref = (ref * mask[:, 1:]).sum(1)
    assert n.tolist() == [3, 4]
    assert torch.allclose(kl_sum, ref, atol=1e-5)
    assert mean_full_kl(student, teacher, mask).item() == pytest.approx(ref.sum().item() / 7, abs=1e-5)
    assert full_kl(teacher, teacher, mask)[0].abs().max().item() < 1e-6


def test_full_kl_teacher_zero_probabilities_are_not_nan():
    teacher = logits_of([0.0, float("-inf"), 0.0, float("-inf")], ROW_UNIFORM)
    student = logits_of(ROW_Q, ROW_UNIFORM)
    kl_sum, _ = full_kl(student, teacher, torch.tensor([[False, True]]))
    assert kl_sum.item() == pytest.approx(0.5 * math.log(0.5 / 0.1) + 0.5 * math.log(0.5 / 0.3), abs=1e-6)


# --- joint_loss -------------------------------------------------------------------


def test_joint_loss_weighted_per_token_means():
    # Parts sft, pg, kl, empty: sft mean 1.0 over 4 tokens, pg mean 2.0 over 3, kl weight 0
    # (logged, not in the total), empty has no tokens (skipped, mean 0 instead of NaN).
    sums = torch.tensor([[3.0 + 1.0, 6.0 + 0.0, 5.0, 0.0]])
    counts = torch.tensor([[4, 3, 1, 0]])
    weights = (0.7, 0.3, 0.0, 1.0)
    total, means = joint_loss(sums, counts, weights)
    assert total.tolist() == pytest.approx([0.7 * 1.0 + 0.3 * 2.0])
    assert means.tolist() == [[1.0, 2.0, 5.0, 0.0]]
    # token_scale is the same accounting per token: sum of loss_t * scale = the joint loss.
    scale = token_scale(counts, weights)
    assert scale[0].tolist() == pytest.approx([0.7 / 4, 0.3 / 3, 0.0, 0.0])
    assert (sums * scale).sum().item() == pytest.approx(1.3)


def test_joint_loss_is_each_adapters_own_per_token_mean():
    """Two adapters with very different token counts: each gets its own means, never a
    mean over the pack (a long adapter must not dilute a short one)."""
    sums = torch.tensor([[10.0, 0.0, 4.0], [1.0, 9.0, 0.0]])
    counts = torch.tensor([[100, 0, 2], [1, 3, 0]])
    total, means = joint_loss(sums, counts, (0.5, 0.1, 1.0))
    assert total.tolist() == pytest.approx([0.5 * 0.1 + 1.0 * 2.0, 0.5 * 1.0 + 0.1 * 3.0])
    assert means.flatten().tolist() == pytest.approx([0.1, 0.0, 2.0, 1.0, 3.0, 0.0])


def test_joint_loss_missing_weight_is_an_error_and_extra_weight_is_fine():
    with pytest.raises(ValueError, match="weights"):
        joint_loss(torch.ones(1, 2), torch.ones(1, 2), (1.0,))
    with pytest.raises(ValueError, match="weights"):
        token_scale(torch.ones(1, 3), (1.0, 0.5))
    # A weight for a part that has no tokens in this step (e.g. no PG example) is fine.
    total, _ = joint_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1, 0]]), (1.0, 0.5))
    assert total.item() == 1.0


def test_joint_loss_all_skipped_still_backpropagates_zero():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    ce_sum, n = token_ce(logits, torch.full((1, 3), IGNORE_INDEX))
    total, means = joint_loss(ce_sum.sum().view(1, 1), n.sum().view(1, 1), (1.0,))
    assert total.item() == 0.0 and means.item() == 0.0
    total.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_joint_loss_stays_on_the_counts_device():
    """Counts and sums on an accelerator (bench/train.py's PEFT arm passes CUDA tensors) never
    meet a host tensor: the weights and the zeros are made on the counts' device. The meta
    device stands in for CUDA here, with the same rule: no mixing with a non-scalar host tensor
    (the first GPU run, 2026-12-04, failed on it)."""
    counts = torch.tensor([[4.0, 3.0, 0.0]], device="meta")
    sums = torch.ones(1, 3, device="meta")
    scale = token_scale(counts, (0.7, 0.3, 1.0))
    total, means = joint_loss(sums, counts, (0.7, 0.3, 1.0))
    assert scale.device.type == total.device.type == means.device.type == "meta"
    assert scale.shape == means.shape == (1, 3) and total.shape == (1,)
