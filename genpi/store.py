"""Artifact store on a local path or any fsspec URI, with atomic publish and a registry.

Layout (see DESIGN.md):
    <store>/prompts/<prompt_id>/<fingerprint>/spec.json, synth/*.parquet, adapter/, eval.json, DONE
    <store>/registry/<id>.json   one record per prompt: its published fingerprint + summary
    <store>/runs/<run_id>/       reports
Each stage has its own completion marker so a killed run redoes only unfinished stages;
`DONE` is written last and nothing without it is ever served or skipped.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from typing import Any, Iterator

import fsspec

REGISTRY = "registry.json"  # one file for every prompt: stores written before the records
REGISTRY_DIR = "registry"


# Settings Ray workers need to reach the store (and the model cache) the way the driver does.
# Only settings that are not secret: runtime_env env_vars are shown by the dashboard and by
# `ray list runtime-envs --detail`, and written to Ray's logs. A credentials *file* path
# (AWS_SHARED_CREDENTIALS_FILE, GOOGLE_APPLICATION_CREDENTIALS) is a setting, not a secret.
_FORWARD_ENV = ("GENPI_CACHE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "GOOGLE_APPLICATION_CREDENTIALS",
                "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")
# Never forwarded: workers read these from their own environment (the pod's Secret, the
# raylet's environment on a local Ray) or from the credentials file named above.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")


def worker_env() -> dict[str, str]:
    """Non-secret environment to pass to Ray workers (runtime_env env_vars): endpoint, region,
    credentials-file paths, caches. Credentials themselves (SECRET_ENV) never travel this way:
    a worker gets them from its own environment (on KubeRay the genpi-s3 Secret in every pod;
    on a local Ray the environment of the process that started it). Only set variables are passed."""
    return {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}


def fingerprint(parts: dict[str, Any]) -> str:
    """Stable short hash of everything that determines a prompt's artifacts."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def open_store(uri: str, create: bool = True) -> "Store":
    """A Store, or a ConfigError that names the store and what is wrong with it."""
    from genpi.config import ConfigError

    try:
        return Store(uri, create=create)
    except (ImportError, ValueError, OSError) as e:
        # An unknown protocol, a missing fsspec backend (s3fs) or an unwritable folder.
        raise ConfigError(f"store: cannot open '{uri}': {type(e).__name__}: {e}") from None


class Store:
    def __init__(self, root: str | os.PathLike, create: bool = True):
        """`create=False` for readers: a store that does not exist reads as empty and is not made."""
        root = str(root)
        self.fs, path = fsspec.core.url_to_fs(root)
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        # A local folder gets real atomic renames and a file lock; object stores get single PUTs.
        self.local = "file" in protocols
        self.root = path.rstrip("/") if not self.local else os.path.abspath(path)
        self.uri = root
        if self.local and os.path.exists(self.root) and not os.path.isdir(self.root):
            raise NotADirectoryError(f"{self.root} is a file, not a folder")
        if create:
            self.fs.makedirs(self.root, exist_ok=True)

    def check_writable(self) -> None:
        """Write and remove a probe file, so a read-only or unreachable store fails before any
        work starts (ConfigError naming the store) rather than after hours of it."""
        from genpi.config import ConfigError

        probe = self.path(f".genpi-write-check-{uuid.uuid4().hex[:8]}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.write_bytes(probe, b"ok")
            self.remove(probe)
        except (OSError, PermissionError) as e:
            raise ConfigError(f"store: cannot write to '{self.uri}': {type(e).__name__}: {e}") from None

    # ---- paths -----------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def prompt_dir(self, prompt_id: str, fp: str) -> str:
        return self.path("prompts", prompt_id, fp)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    # ---- atomic writes ---------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Readers see the old file or the new one, never a partial one."""
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self.local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            # Object stores make a single PUT visible atomically.
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode())

    def read_json(self, path: str) -> Any:
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read().decode())

    def write_parquet(self, path: str, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        self.write_bytes(path, buf.getvalue())

    def read_parquet(self, path: str) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        with self.fs.open(path, "rb") as f:
            return pq.read_table(f).to_pylist()

    def put_dir(self, local_dir: str, path: str) -> None:
        """Copy a finished local folder to `path` so it appears whole or not at all."""
        if self.local:
            import shutil

            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copytree(local_dir, tmp)
            if os.path.exists(path):
                # Only an unfinished earlier attempt can be here (no DONE yet): replace it.
                shutil.rmtree(path)
            os.replace(tmp, path)
        else:
            # Files first; the caller's marker (written after) is what makes it count.
            self.fs.put(local_dir.rstrip("/") + "/", path + "/", recursive=True)

    def get_dir(self, path: str, local_dir: str) -> str:
        """A local copy of a stored folder (itself, on a local store)."""
        if self.local:
            return path
        self.fs.get(path.rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
        return local_dir

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # ---- completion and registry -----------------------------------------------------
    def is_done(self, prompt_id: str, fp: str) -> bool:
        return self.exists(self.path("prompts", prompt_id, fp, "DONE"))

    def registry(self) -> dict[str, dict[str, Any]]:
        """Prompt id -> published entry ({"fingerprint", "published_at", summary...}).

        One record per prompt, `registry/<id>.json`, each written whole by one PUT: two
        publishers (two jobs, `genpi eval` during a job) never overwrite each other's
        entries, as a shared read-modify-written file does on an object store. Stores
        written before hold one `registry.json`; its entries count unless a record replaces
        them. Records are cached by version (one listing per call; only new or changed
        records are fetched), since serving re-reads the registry every few seconds."""
        reg: dict[str, dict[str, Any]] = {}
        legacy = self.path(REGISTRY)
        if self.exists(legacy):
            reg.update(self.read_json(legacy))
        folder = self.path(REGISTRY_DIR)
        try:
            self.fs.invalidate_cache(folder)  # object stores cache listings; a publish must show
            infos = [i for i in self.fs.ls(folder, detail=True)
                     if i.get("type") == "file" and i["name"].endswith(".json")]
        except FileNotFoundError:
            return reg
        cache = self.__dict__.setdefault("_records", {})
        versions = {i["name"]: tuple(str(i.get(k)) for k in ("ino", "mtime", "size", "ETag", "LastModified"))
                    for i in infos}
        stale = [n for n, v in versions.items() if cache.get(n, (None,))[0] != v]
        if stale:
            for name, blob in self.fs.cat(stale, on_error="omit").items():
                try:
                    entry = json.loads(blob.decode())
                except ValueError:
                    continue  # a foreign or broken file is not an entry (serving logs malformed ones)
                cache[name] = (versions[name], entry)
        for name in list(cache):
            if name not in versions:
                del cache[name]
        for name, (_, entry) in cache.items():
            pid = entry.get("id") if isinstance(entry, dict) else None
            if isinstance(pid, str):
                reg[pid] = {k: v for k, v in entry.items() if k != "id"}
        return reg

    def publish(self, prompt_id: str, fp: str, summary: dict[str, Any] | None = None) -> None:
        """Mark the prompt DONE (last file written) and point its registry record at it."""
        done = self.path("prompts", prompt_id, fp, "DONE")
        if not self.exists(done):
            self.write_json(done, {"finished_at": time.time()})
        self.write_json(self.registry_record(prompt_id),
                        {"id": prompt_id, "fingerprint": fp, "published_at": time.time(), **(summary or {})})

    def registry_record(self, prompt_id: str) -> str:
        return self.path(REGISTRY_DIR, f"{prompt_id}.json")

    def published(self, prompt_id: str) -> str | None:
        entry = self.registry().get(prompt_id)
        if entry and self.is_done(prompt_id, entry["fingerprint"]):
            return entry["fingerprint"]
        return None
