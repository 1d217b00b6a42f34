"""Training and evaluation losses: pure torch functions, normalised per token.

Alignment convention (the same for every function here, and the same as
Hugging Face ``labels``): every per-position input -- ``labels``, the teacher's
top-k ``teacher_ids`` / ``teacher_logprobs`` and the boolean ``mask`` -- is
aligned with ``input_ids``. Position ``t`` describes the token *at* ``t``, which
the model predicts from ``logits[:, t - 1]``. The functions shift internally, so
callers never shift anything; position 0 has no prediction and is ignored.

Every loss returns ``(sum[B], n[B])``: the per-sequence sum of the per-token
loss and the number of target tokens of that sequence. Callers average per token
over whatever group they need (a batch, one adapter in a pack) by summing both
and dividing; ``mean_*`` helpers do it for a whole batch, and :func:`token_scale` /
:func:`joint_loss` are the one accounting of the weighted joint loss per adapter.

The math runs in float32 even when logits are bf16/fp16, and only on the rows
that are targets (selected with a boolean index before the upcast), so padding
and prompt tokens cost no float32 vocabulary-sized memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100

# Teacher tail mass at or below this is treated as zero: with K float32
# logprobs, 1 - sum(p_k) carries a rounding error of a few 1e-7, so a smaller
# "tail" is noise and its log would be meaningless.
TAIL_EPS = 1e-6

# A large finite negative logit for the vocabulary entries removed from the
# student's tail sum. Finite (not -inf) so that a row whose whole vocabulary is
# in the teacher's top-k still has a finite logsumexp and NaN-free gradients.
_REMOVED_LOGIT = torch.finfo(torch.float32).min
# Floor for the student's log tail probability, log of float32's smallest
# normal number: below it the tail is zero for all practical purposes, and the
# floor keeps the loss finite in the degenerate case above.
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)

LossParts = tuple[Tensor, Tensor]


def _check_logits(logits: Tensor, batch_shape: tuple[int, ...], what: str) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if tuple(logits.shape[:2]) != tuple(batch_shape):
        raise ValueError(
            f"logits [B, T] = {tuple(logits.shape[:2])} does not match {what} {tuple(batch_shape)}"
        )


def _per_sequence_sum(values: Tensor, target_mask: Tensor) -> Tensor:
    """Scatter per-target values (in boolean-index order of ``target_mask``) back to
    per-sequence sums of shape [B]."""
    batch_size = target_mask.shape[0]
    batch_index = torch.arange(batch_size, device=target_mask.device)
    batch_index = batch_index[:, None].expand_as(target_mask)[target_mask]
    out = torch.zeros(batch_size, dtype=values.dtype, device=values.device)
    return out.index_add(0, batch_index, values)


def _batch_mean(parts: LossParts) -> Tensor:
    loss_sum, n = parts
    # clamp: an empty batch gives 0 / 1 = 0 instead of NaN, with no host sync.
    return loss_sum.sum() / n.sum().clamp_min(1)


def token_ce(logits: Tensor, labels: Tensor) -> LossParts:
    """Cross-entropy of ``labels`` (aligned with input_ids, -100 = ignore) under ``logits``.

    Returns ``(loss_sum[B], n_tokens[B])``; ``loss_sum`` is float32, ``n_tokens`` int64.
    """
    _check_logits(logits, tuple(labels.shape), "labels")
    targets = labels[:, 1:]
    target_mask = targets != IGNORE_INDEX
    rows = logits[:, :-1][target_mask].float()  # [N, V], targets only
    nll = F.cross_entropy(rows, targets[target_mask], reduction="none")
    return _per_sequence_sum(nll, target_mask), target_mask.sum(dim=1)


def mean_token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token mean cross-entropy over the whole batch; 0 (not NaN) when no targets."""
    return _batch_mean(token_ce(logits, labels))


def _teacher_rows(logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, mask: Tensor):
    """Both top-k divergences' inputs, checked and gathered at the target positions:
    (target_mask [B, T-1], student rows [N, V] in the logits' dtype, teacher logprobs [N, K]
    with padded slots 0, ids [N, K] with padded slots pointing at the row's first id, valid [N, K])."""
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.dim() != 3:
        raise ValueError(
            "teacher_ids and teacher_logprobs must both be [B, T, K], got "
            f"{tuple(teacher_ids.shape)} and {tuple(teacher_logprobs.shape)}"
        )
    if tuple(mask.shape) != tuple(teacher_ids.shape[:2]):
        raise ValueError(f"mask {tuple(mask.shape)} must be [B, T] = {tuple(teacher_ids.shape[:2])}")
    _check_logits(logits, tuple(mask.shape), "mask")
    target_mask = mask[:, 1:].bool()
    rows = logits[:, :-1][target_mask]  # [N, V], a fresh copy (boolean indexing), logits dtype
    t_lp = teacher_logprobs[:, 1:][target_mask].float()  # [N, K]
    ids = teacher_ids[:, 1:][target_mask].long()  # [N, K]
    valid = t_lp != float("-inf")
    # Padded slots point at the row's first (real) id: gathers stay in range and
    # the scatter that removes the top-k removes nothing extra. Their probability is 0.
    ids = torch.where(valid, ids, ids[:, :1])
    return target_mask, rows, t_lp.masked_fill(~valid, 0.0), ids, valid


def topk_kl(
    logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    tail_eps: float = TAIL_EPS,
) -> LossParts:
    """KL(teacher || student) over the teacher's top-k tokens plus one tail bucket.

    ``teacher_ids`` [B, T, K] (int64) and ``teacher_logprobs`` [B, T, K] at position
    t are the teacher's top-k for the token *at* t; ``mask`` [B, T] marks the
    positions that carry a teacher row (like ``labels != -100``).

    Ragged top-k (e.g. vLLM returning k or k + 1 entries) is padded with logprob
    ``-inf``; such slots count as probability 0 (their ids are ignored). Every
    masked row needs at least one finite logprob, in its first slot, and no
    duplicate ids.

    With p the teacher and q the student (full softmax over V):
        KL = sum_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail)
    where p_tail = max(0, 1 - sum_k p_k), q_tail = 1 - sum_k q_k computed as a
    logsumexp over the student logits outside the top-k (exact, no cancellation).
    The tail term is 0 when p_tail <= ``tail_eps``.

    Returns ``(kl_sum[B], n_tokens[B])``.
    """
    target_mask, rows, t_lp, ids, valid = _teacher_rows(logits, teacher_ids, teacher_logprobs, mask)
    p = t_lp.exp() * valid  # [N, K] teacher probabilities, 0 in padded slots

    # Student log-normaliser split into top-k and tail parts. Only one float32
    # [N, V] tensor is materialised: the tail logits (top-k removed in place).
    s_top = rows.gather(-1, ids).float()  # [N, K]
    tail_logits = rows.float()
    if tail_logits.data_ptr() == rows.data_ptr():  # already float32: .float() aliased
        tail_logits = tail_logits.clone()
    tail_logits.scatter_(-1, ids, _REMOVED_LOGIT)
    lse_tail = torch.logsumexp(tail_logits, dim=-1)  # [N]
    lse_top = torch.logsumexp(s_top.masked_fill(~valid, float("-inf")), dim=-1)
    lse = torch.logaddexp(lse_tail, lse_top)  # log sum_v exp(s_v)

    log_q_top = s_top - lse[:, None]
    kl_top = (p * (t_lp - log_q_top)).sum(dim=-1)

    p_tail = (1.0 - p.sum(dim=-1)).clamp_min(0.0)
    has_tail = p_tail > tail_eps
    log_q_tail = (lse_tail - lse).clamp_min(_LOG_TINY)
    # where() on sanitised inputs: the unused branch stays finite, so gradients stay NaN-free.
    log_p_tail = torch.log(torch.where(has_tail, p_tail, torch.ones_like(p_tail)))
    kl_tail = torch.where(has_tail, p_tail * (log_p_tail - log_q_tail), torch.zeros_like(p_tail))

    return _per_sequence_sum(kl_top + kl_tail, target_mask), target_mask.sum(dim=1)


def topk_reverse_kl(logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, mask: Tensor,
                    *, tail_floor: float = TAIL_EPS) -> LossParts:
    """KL(student || teacher) over the teacher's top-k tokens plus one tail bucket: the
    on-policy phase's loss (genpi.train.onpolicy), where the student wrote the tokens.

    Same inputs as :func:`topk_kl`. With q the student (full softmax) and p the teacher:
        KL = sum_k q_k (log q_k - log p_k) + q_tail (log q_tail - log p_tail)
    Reverse KL is mode-seeking: the student is pushed off tokens the teacher finds unlikely
    rather than made to cover all of the teacher's. The teacher's tail mass is floored at
    ``tail_floor`` (a teacher whose top-k holds all its mass would make any student tail
    mass infinitely costly). Returns ``(kl_sum[B], n_tokens[B])``.
    """
    target_mask, rows, t_lp, ids, valid = _teacher_rows(logits, teacher_ids, teacher_logprobs, mask)
    log_q = torch.log_softmax(rows.float(), dim=-1)  # [N, V]
    log_q_top = log_q.gather(-1, ids)  # [N, K]
    q_top = log_q_top.exp() * valid
    kl_top = (q_top * (log_q_top - t_lp)).sum(dim=-1)
    # Student tail: logsumexp outside the top-k ids (exact, no 1 - sum cancellation).
    tail = log_q.clone()
    tail.scatter_(-1, ids, _REMOVED_LOGIT)
    log_q_tail = torch.logsumexp(tail, dim=-1).clamp_min(_LOG_TINY)
    p_tail = (1.0 - (t_lp.exp() * valid).sum(dim=-1)).clamp_min(tail_floor)
    kl_tail = log_q_tail.exp() * (log_q_tail - torch.log(p_tail))
    return _per_sequence_sum(kl_top + kl_tail, target_mask), target_mask.sum(dim=1)


def topk_both_kl(logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> LossParts:
    """KL(teacher || student) + KL(student || teacher) over the same top-k rows (the on-policy
    phase's train.on_policy_divergence="both"): mass-covering and mode-seeking at once."""
    fwd, n = topk_kl(logits, teacher_ids, teacher_logprobs, mask)
    rev, _ = topk_reverse_kl(logits, teacher_ids, teacher_logprobs, mask)
    return fwd + rev, n


def mean_topk_kl(
    logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, mask: Tensor, *, tail_eps: float = TAIL_EPS
) -> Tensor:
    """Per-token mean of :func:`topk_kl` over the batch; 0 (not NaN) when the mask is empty."""
    return _batch_mean(topk_kl(logits, teacher_ids, teacher_logprobs, mask, tail_eps=tail_eps))


def full_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> LossParts:
    """Per-token KL(teacher || student) over the full vocabulary (for evaluation).

    Both logits are aligned with the *same* token sequence (the caller strips the
    teacher's prompt prefix so that position t of both predicts the same token);
    ``mask`` marks target positions like ``labels != -100``. Returns ``(kl_sum[B], n[B])``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    _check_logits(student_logits, tuple(mask.shape), "mask")
    target_mask = mask[:, 1:].bool()
    log_q = torch.log_softmax(student_logits[:, :-1][target_mask].float(), dim=-1)
    log_p = torch.log_softmax(teacher_logits[:, :-1][target_mask].float(), dim=-1)
    p = log_p.exp()
    # Tokens the teacher gives exactly probability 0 contribute 0 (0 * log 0 := 0).
    per_vocab = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return _per_sequence_sum(per_vocab.sum(dim=-1), target_mask), target_mask.sum(dim=1)


def mean_full_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Per-token mean of :func:`full_kl` over the batch; 0 when the mask is empty."""
    return _batch_mean(full_kl(student_logits, teacher_logits, mask))


# The joint loss's parts, in the order of the last axis of every [K, 3] tensor below.
PARTS = ("sft", "pg", "kl")


def token_scale(counts: Tensor, weights: Sequence[float]) -> Tensor:
    """The per-token accounting of the joint loss, for one adapter or a pack of K.

    ``counts`` [K, P]: target tokens of part p (in :data:`PARTS` order) that adapter k has
    in the whole step; ``weights`` [P]: the parts' weights. Returns [K, P] = w_p / n_kp,
    and 0 where adapter k has no token of part p (an empty part would be 0/0). With it,
    ``sum over target tokens of loss_t * scale[adapter(t), part(t)]`` is
    ``sum_k sum_p w_p * mean_kp``: each adapter's own joint loss of per-token means,
    however the step's samples are split into micro-batches, ranks or pack slots --
    the scale holds the whole step's counts, so every chunk contributes its exact share.
    """
    # On the counts' device: a host tensor of 3 weights divided by CUDA counts fails (seen on
    # the first GPU run, 2026-12-04, where bench/train.py's PEFT arm passes CUDA counts).
    w = torch.as_tensor(weights, dtype=torch.float32, device=counts.device)
    if counts.shape[-1] != w.numel():
        # A part without a weight is a configuration error, never an implicit 0.
        raise ValueError(f"{counts.shape[-1]} loss parts but {w.numel()} weights")
    counts = counts.to(torch.float32)
    return torch.where(counts > 0, w / counts.clamp_min(1), torch.zeros((), device=counts.device))


def joint_loss(sums: Tensor, counts: Tensor, weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """(joint loss [K], per-token means [K, P]) from per-adapter loss sums and token counts.

    ``sums`` [K, P] are the per-part sums of the per-token losses (the ``sum`` of the
    ``(sum, n)`` pairs above, added up per adapter), ``counts`` [K, P] their token
    counts. The loss is ``sum_p w_p * sum_kp / n_kp`` (:func:`token_scale`); parts with
    weight 0 or no tokens add nothing. It stays in the autograd graph of ``sums`` even
    when every part is skipped, so ``backward()`` then yields zero gradients. The means
    (0 where there are no tokens) are for logging.
    """
    loss = (sums * token_scale(counts, weights).to(sums.device)).sum(-1)
    c = counts.to(sums.device)
    means = torch.where(c > 0, sums / c.clamp_min(1), torch.zeros((), device=sums.device))
    return loss, means
