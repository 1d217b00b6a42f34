"""Continuous batching of chat requests for many LoRA adapters on one base model (CPU path).

One model thread owns the model. Requests (rows) queue up; between two decoding steps the
thread admits new rows, prefills them together (left-padded) and merges their KV cache into
the running batch, then runs one decoding step for every row at once. Each row carries its
own adapter: the adapters' A/B weights sit stacked in genpi.train.multilora's PackedLora
(one slot per adapter) and every forward is routed per row (slot index, and a per-row scale
= alpha/r x strength; a bare-base row has scale 0, which adds exactly nothing). So rows of
different adapters, strengths and the base share one forward without seeing each other:
a row's attention sees only its own tokens (padding is masked), its position ids are its
own, and its LoRA update is its own slot's.

Why a KV cache (not recomputing the batch each step): recomputation is O(length^2) per
token; with the cache a step costs one token per row. A joining row is prefilled on its own
forward (with the other joining rows) and its cache left-padded to the batch's width.

Adapter slots: loaded into a free slot on a row's admission, least recently used slot
evicted when full, but never a slot a running row uses (a row keeps its weights until it
finishes; a republished adapter is a new key, hence a new slot). A row whose adapter finds
no free slot waits in the queue until a running row finishes.

Nothing here knows Ray or HTTP; torch is imported by the caller's model.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from genpi.serve.lora_slots import LoraSlots

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The row's client went away; its result is never read."""


@dataclass
class Row:
    """One request in the batch."""
    prompt: list[int]
    max_new_tokens: int
    key: str | None = None  # adapter key; None = the bare base
    strength: float = 1.0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    emit: Callable[[str], None] | None = None  # streamed deltas, called on the model thread
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    # model-thread state
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: str = ""
    slot: int | None = None
    finish: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True  # read by the model thread between steps


class Batcher:
    """The model thread: continuous batching over `model` (a causal LM) with `slots`."""

    def __init__(self, model, tok, eos_ids: list[int], pad_id: int, slots: LoraSlots,
                 max_batch: int, max_positions: int | None = None):
        self.model, self.tok, self.slots = model, tok, slots
        self.eos, self.pad_id, self.max_batch = set(eos_ids), pad_id, max(1, max_batch)
        self.max_positions = max_positions
        self.device = next(model.parameters()).device
        self._queue: collections.deque[Row] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.rows: list[Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, L]: 1 where the cache holds a real token
        self.steps = 0  # decoding forwards run (tests and the bench read it)
        self.max_rows_seen = 0
        # Rows by fate (stats()): a client that went away while queued never reaches `admitted`.
        self.waiting = 0  # submitted, neither admitted nor done yet (guarded by _cv)
        self.admitted = 0
        self.cancelled_queued = 0
        self.cancelled_running = 0
        self._thread = threading.Thread(target=self._run, name="genpi-model", daemon=True)
        self._thread.start()

    def submit(self, row: Row) -> Row:
        if row.temperature > 0:
            # Each row draws from its own generator: a seeded request replays exactly and
            # never shifts another request's draws (the global RNG is not touched).
            seed = secrets.randbits(63) if row.seed is None else row.seed % 2**63
            row.generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._cv:
            if self._closed:
                raise RuntimeError("the model thread is closed")
            self._queue.append(row)
            self.waiting += 1
            self._cv.notify()
        return row

    def stats(self) -> dict[str, int]:
        """Counters for tests, the bench and the replica's stats (safe from any thread)."""
        with self._cv:
            waiting = self.waiting
        return {"steps": self.steps, "running": len(self.rows), "waiting": waiting, "admitted": self.admitted,
                "cancelled_queued": self.cancelled_queued, "cancelled_running": self.cancelled_running,
                "max_rows_seen": self.max_rows_seen, **self.slots.stats()}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ---- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self.rows and not self._closed:
                    self._cv.wait()
                if self._closed:
                    break
                waiting = list(self._queue)
                self._queue.clear()
            new, back = self._admit(waiting)
            with self._cv:
                self._queue.extendleft(reversed(back))  # keep arrival order
                self.waiting -= len(waiting) - len(back)
            self.admitted += len(new)
            try:
                with torch.no_grad():
                    self._step(new)
            except Exception as e:  # noqa: BLE001 - fail the rows, keep the thread alive
                log.exception("batched generation failed")
                for r in [*self.rows, *new]:
                    self._done(r, error=e)
                self.rows, self._cache, self._mask = [], None, None
        for r in [*self.rows, *self._queue]:
            self._done(r, error=RuntimeError("the model replica is shutting down"))

    def _admit(self, waiting: list[Row]) -> tuple[list[Row], list[Row]]:
        new: list[Row] = []
        back: list[Row] = []
        for r in waiting:
            if r.cancelled or r.future.cancelled():
                self.cancelled_queued += 1
                self._done(r, error=Cancelled())
            elif len(self.rows) + len(new) >= self.max_batch:
                back.append(r)
            elif r.key is None or r.strength == 0:
                new.append(r)
            else:
                try:
                    r.slot = self.slots.acquire(r.key)
                except Exception as e:  # noqa: BLE001 - a broken adapter fails its own request
                    log.exception("loading adapter %s failed", r.key)
                    self._done(r, error=e)
                    continue
                (new if r.slot is not None else back).append(r)
        return new, back

    def _step(self, new: list[Row]) -> None:
        if new:
            logits, cache, mask = self._prefill(new)
            self._take(new, logits)
            keep = [i for i, r in enumerate(new) if r.finish is None]
            for r in new:
                if r.finish is not None:
                    self._done(r)
            if keep:
                cache.batch_select_indices(torch.tensor(keep, device=self.device))
                self._merge([new[i] for i in keep], cache, mask[keep])
        self._drop_cancelled()
        if not self.rows:
            return
        self.max_rows_seen = max(self.max_rows_seen, len(self.rows))
        ids = torch.tensor([[r.out[-1]] for r in self.rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=1)
        pos = torch.tensor([[len(r.prompt) + len(r.out) - 1] for r in self.rows], device=self.device)
        with self.slots.route(self.rows):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self._cache,
                             use_cache=True, logits_to_keep=1)
        self.steps += 1
        self._cache, self._mask = out.past_key_values, mask
        self._take(self.rows, out.logits[:, -1])
        self._remove([i for i, r in enumerate(self.rows) if r.finish is not None])

    def _prefill(self, rows: list[Row]):
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token is at the right edge
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        cache = DynamicCache()
        with self.slots.route(rows):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values, mask

    @staticmethod
    def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _merge(self, rows: list[Row], cache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding the narrower cache."""
        from transformers import DynamicCache

        if not self.rows:
            self.rows, self._cache, self._mask = list(rows), cache, mask
            return
        old_w, new_w = self._mask.shape[1], mask.shape[1]
        width = max(old_w, new_w)

        def pad(t: torch.Tensor, n: int) -> torch.Tensor:  # n zero columns on the left of dim -2
            if n == 0:
                return t
            return torch.cat([t.new_zeros(*t.shape[:-2], n, t.shape[-1]), t], dim=-2)

        kv = [(torch.cat([pad(k0, width - old_w), pad(k1, width - new_w)]),
               torch.cat([pad(v0, width - old_w), pad(v1, width - new_w)]))
              for (k0, v0), (k1, v1) in zip(self._kv(self._cache), self._kv(cache))]
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (width - old_w, 0)),
                                torch.nn.functional.pad(mask, (width - new_w, 0))])
        self._cache = DynamicCache(ddp_cache_data=kv)
        self.rows += rows

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self.rows) if r.cancelled or r.future.cancelled()]
        for i in gone:
            self.rows[i].finish = "cancelled"
        self.cancelled_running += len(gone)
        self._remove(gone)

    def _remove(self, gone: list[int]) -> None:
        if not gone:
            return
        for i in gone:
            self._done(self.rows[i])
        keep = [i for i in range(len(self.rows)) if i not in set(gone)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        self._cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self._mask = self._mask[keep]
        # Columns that are padding in every remaining row are dropped (less attention work).
        first = int((self._mask.cumsum(1) == 0).sum(1).min())
        if first:
            from transformers import DynamicCache

            self._mask = self._mask[:, first:]
            self._cache = DynamicCache(ddp_cache_data=[(k[:, :, first:], v[:, :, first:])
                                                       for k, v in self._kv(self._cache)])

    # ---- tokens -----------------------------------------------------------------------
    def _take(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Choose each row's next token, then update its text, deltas and finish state."""
        greedy = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            # A temperature this small is greedy in the limit (dividing by it overflows).
            t = greedy[i] if r.temperature < 1e-4 else self._sample(logits[i], r)
            r.out.append(t)
            n = len(r.out)
            if t in self.eos:
                r.finish = "stop"
            elif n >= r.max_new_tokens or (self.max_positions and len(r.prompt) + n >= self.max_positions):
                r.finish = "length"
            if r.emit is not None or r.stop:
                self._text(r)

    @staticmethod
    def _sample(logits: torch.Tensor, r: Row) -> int:
        # As transformers' temperature + top-p warpers (top_k off), with the row's generator.
        probs = torch.softmax(logits.float() / r.temperature, dim=-1)
        if r.top_p < 1:
            sp, si = probs.sort(descending=True)
            cut = sp.cumsum(-1) - sp > r.top_p  # keep the smallest prefix reaching top_p
            sp[cut] = 0
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        return int(torch.multinomial(probs, 1, generator=r.generator))

    def _text(self, r: Row) -> None:
        final = r.finish is not None
        text = self.tok.decode([t for t in r.out if t not in self.eos], skip_special_tokens=True).strip()
        hold = len(text)
        for s in r.stop:
            at = text.find(s)
            if at >= 0:  # the reply ends before the stop sequence, which is not returned
                text, hold, r.finish, final = text[:at], at, "stop", True
        if not final:
            if text.endswith("\ufffd"):
                return  # an incomplete multi-byte character: wait for its next token
            for s in r.stop:  # hold back a tail that may be the start of a stop sequence
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = min(hold, len(text) - k)
                        break
        r.text = text
        shown = text[:hold]
        if r.emit is not None and shown.startswith(r.sent) and len(shown) > len(r.sent):
            r.emit(shown[len(r.sent):])
            r.sent = shown

    def _done(self, r: Row, error: BaseException | None = None) -> None:
        if r.slot is not None:
            self.slots.release(r.key)
            r.slot = None
        if r.future.done():
            return
        try:
            if error is not None or r.finish == "cancelled":
                r.future.set_exception(error or Cancelled())
            else:
                if r.emit is None and not r.stop:
                    r.text = self.tok.decode([t for t in r.out if t not in self.eos],
                                             skip_special_tokens=True).strip()
                elif r.emit is not None and r.text.startswith(r.sent) and len(r.text) > len(r.sent):
                    r.emit(r.text[len(r.sent):])  # the held-back tail, now known to belong
                    r.sent = r.text
                r.future.set_result(r)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by its caller meanwhile
