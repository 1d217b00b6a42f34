"""Which adapter a model id names, and where its files are: the registry is the only way in.

Also the copy of published adapters into Ray Serve LLM's layout (`export_lora_layout`).

A request's `model` is validated against the manifest's id rule, then looked up as a key
of the store's registry (a dict lookup); the fingerprint comes from the registry and is
itself checked to be hex. Only then is a path built, so a hostile id ("../x", "/etc",
"%2e%2e", "s3://...") is refused before anything touches the filesystem.

An adapter is served only when its fingerprint folder has `DONE` (written last by
publish), so a half-written adapter is never loaded. The multiplex key is "id@fingerprint":
a republished adapter (new fingerprint) is a new key, so new requests load the new one
while the old one ages out of the replicas' LRU caches.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from genpi.chat import valid_id
from genpi.config import GenpiConfig
from genpi.serve.config import lora_export_uri
from genpi.serve.openai import FINGERPRINT_RE, ApiError, check_model_id
from genpi.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    id: str
    fingerprint: str

    @property
    def key(self) -> str:
        return f"{self.id}@{self.fingerprint}"

    @classmethod
    def from_key(cls, key: str) -> "AdapterRef":
        """Inverse of `key`, validated again: the key crosses a process boundary."""
        model_id, sep, fp = key.rpartition("@")
        if not sep or not valid_id(model_id) or not FINGERPRINT_RE.fullmatch(fp):
            raise ApiError(400, f"malformed adapter key {key[:80]!r}", param="model", code="invalid_model_id")
        return cls(model_id, fp)


def adapter_id(model: str, base_name: str) -> str | None:
    """The adapter id a request's `model` names, or None for the bare base.

    Ray Serve LLM (the GPU path) names an adapter `<base>:<id>`; the CPU app accepts that
    form as well as the plain `<id>`, so one client configuration works on both backends.
    The rest is checked by `resolve` (':' is not allowed in an id, so `other:<id>` is a 400).
    """
    if model == base_name:
        return None
    prefix = f"{base_name}:"
    return model[len(prefix):] if model.startswith(prefix) else model


class AdapterRegistry:
    """Model id -> published adapter, re-reading the store's registry at most every `refresh_s`.

    A fresh read per request would cost one GET per request on an object store; a short
    cache keeps hot publish visible within `refresh_s` seconds at a fraction of that.
    """

    def __init__(self, store: Store, refresh_s: float = 2.0):
        self.store = store
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._read_at = float("-inf")

    def entries(self, fresh: bool = False) -> dict[str, dict[str, Any]]:
        with self._lock:
            if fresh or time.monotonic() - self._read_at >= self.refresh_s:
                reg = self.store.registry()
                # Only entries that are well-formed and DONE are servable; a registry written
                # by hand (or by a newer genpi) must not steer a path anywhere else.
                ok = {}
                for model_id, entry in reg.items():
                    fp = entry.get("fingerprint") if isinstance(entry, dict) else None
                    if valid_id(model_id) and isinstance(fp, str) and FINGERPRINT_RE.fullmatch(fp):
                        ok[model_id] = entry
                    else:
                        log.warning("registry entry %r is malformed; not served", model_id[:80])
                self._entries = ok
                self._read_at = time.monotonic()
            return dict(self._entries)

    def resolve(self, model_id: str) -> AdapterRef:
        """The published adapter for `model_id`: 400 for an invalid id, 404 for an unknown one."""
        check_model_id(model_id)  # before any store access
        entry = self.entries().get(model_id)
        if entry is None:
            # A publish may have just happened: one fresh read before saying no.
            entry = self.entries(fresh=True).get(model_id)
        if entry is None or not self.store.is_done(model_id, entry["fingerprint"]):
            known = sorted(self.entries())
            shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
            raise ApiError(404, f"the model '{model_id}' does not exist (published: {shown or 'none'})",
                           param="model", code="model_not_found")
        return AdapterRef(model_id, entry["fingerprint"])

    def published(self) -> list[tuple[str, dict[str, Any]]]:
        """(id, registry entry) of every servable adapter, for /v1/models."""
        return [(i, e) for i, e in sorted(self.entries().items()) if self.store.is_done(i, e["fingerprint"])]


class AdapterFiles:
    """Local copies of stored adapters, keyed by (id, fingerprint); spec facts per adapter."""

    def __init__(self, store: Store, cache_dir: str):
        self.store = store
        self.cache_dir = cache_dir
        self._spec: dict[str, dict[str, Any]] = {}

    def local_dir(self, ref: AdapterRef) -> str:
        """A local PEFT folder for the adapter (the store's own folder on a local store)."""
        src = f"{self.store.prompt_dir(ref.id, ref.fingerprint)}/adapter"
        if not self.store.is_done(ref.id, ref.fingerprint):
            raise ApiError(404, f"the adapter '{ref.id}' ({ref.fingerprint}) is not published (no DONE)",
                           param="model", code="model_not_found")
        if self.store.local:
            return src
        dest = os.path.join(self.cache_dir, ref.id, ref.fingerprint)
        if os.path.isfile(os.path.join(dest, "adapter_config.json")):
            return dest
        # Download next to the target, then rename: a replica killed mid-download leaves
        # only a temp folder, never a half adapter at `dest`.
        tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            self.store.get_dir(src, tmp)
            try:
                os.replace(tmp, dest)
            except OSError:  # another process finished first: keep theirs
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def spec(self, ref: AdapterRef) -> dict[str, Any]:
        if ref.key not in self._spec:
            self._spec[ref.key] = self.store.read_json(f"{self.store.prompt_dir(ref.id, ref.fingerprint)}/spec.json")
        return self._spec[ref.key]


def export_lora_layout(cfg: GenpiConfig) -> dict[str, str]:
    """Copy every published adapter to `<lora_export_uri(cfg)>/<id>/` for Ray Serve LLM's
    dynamic LoRA loading (see genpi.serve.config); returns id -> fingerprint copied.

    An id whose exported copy already has the published fingerprint (recorded in
    `<id>/genpi.json`) is skipped, so running it after every publish is cheap.
    """
    store = Store(cfg.store)
    dest = Store(lora_export_uri(cfg))
    done: dict[str, str] = {}
    for model_id, entry in AdapterRegistry(store, 0).published():
        fp = entry["fingerprint"]
        marker = dest.path(model_id, "genpi.json")
        if dest.exists(marker) and dest.read_json(marker).get("fingerprint") == fp:
            continue
        src = f"{store.prompt_dir(model_id, fp)}/adapter"
        names = sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(src, detail=False))
        # adapter_config.json last: Ray Serve LLM ignores a folder until its config exists,
        # so a half-copied adapter is never listed.
        for name in sorted(names, key=lambda n: n == "adapter_config.json"):
            with store.fs.open(f"{src}/{name}", "rb") as f:
                dest.write_bytes(dest.path(model_id, name), f.read())
        dest.write_json(marker, {"fingerprint": fp})
        done[model_id] = fp
        log.info("exported adapter %s (%s) to %s", model_id, fp, dest.path(model_id))
    return done
