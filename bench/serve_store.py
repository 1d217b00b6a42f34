"""The store side of bench/serve.py: the serve store on a real S3-compatible server (`--s3`)
and the adapter read figures of a row, whichever the store.

`--s3` starts moto's S3 server on 127.0.0.1 in a process of its own (an object store is
another process, and the bench's 16 client threads should not share its GIL), points the
AWS_* variables of this process at it before Ray starts (the local Ray's raylet, hence the
replicas, inherit them; nothing goes in a runtime_env, see tests/test_credentials.py), and
copies the locally published store into `s3://genpi-bench/<name>` as it is: the registry
records, DONE markers and adapter folders that the app reads.
"""
from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUCKET = "genpi-bench"
# Any value does for moto; they are this process's own, never a runtime_env's.
_ENV = {"AWS_ACCESS_KEY_ID": "genpi-bench", "AWS_SECRET_ACCESS_KEY": "genpi-bench", "AWS_DEFAULT_REGION": "us-east-1"}
_SERVER = """
import logging
import sys
import boto3
from moto.server import ThreadedMotoServer
port, bucket = int(sys.argv[1]), sys.argv[2]
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
server.start()
boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="genpi-bench",
             aws_secret_access_key="genpi-bench", region_name="us-east-1").create_bucket(Bucket=bucket)
print("ready", flush=True)
sys.stdin.read()  # serves until the bench closes stdin or exits
server.stop()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_store(local_root: str):
    """Yields `s3://genpi-bench/<name of local_root>`, a copy of the local store on a moto
    server that lives as long as the context; the AWS_* variables are restored after."""
    import s3fs

    from genpi.store import Store

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), BUCKET], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    saved = {k: os.environ.get(k) for k in (*_ENV, "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN")}
    try:
        if not any(line.strip() == "ready" for line in proc.stdout):  # EOF: it exited
            raise RuntimeError(f"the S3 server (moto) did not start: exit {proc.wait(timeout=30)}")
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.update({**_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
        # s3fs keeps one filesystem per argument set, with the endpoint read when it was made.
        s3fs.S3FileSystem.clear_instance_cache()
        uri = f"s3://{BUCKET}/{Path(local_root).name}"
        local, remote = Store(local_root, create=False), Store(uri)
        t0 = time.perf_counter()
        for part in ("prompts", "registry"):
            remote.fs.put(f"{local.path(part)}/", f"{remote.path(part)}/", recursive=True)
        n = len(remote.registry())
        if n != len(local.registry()):
            raise RuntimeError(f"{uri}: {n} registry records after the copy, {len(local.registry())} in {local_root}")
        print(f"copied {n} published adapters to {uri} (moto on 127.0.0.1:{port}) in {time.perf_counter() - t0:.0f} s")
        yield uri
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


def summary(ms: list[float]) -> dict | None:
    """n, mean, p50, p95 of some durations in ms (inclusive quantiles: never past the largest)."""
    if not ms:
        return None
    q = statistics.quantiles(ms, n=20, method="inclusive") if len(ms) > 1 else [ms[0]] * 19
    return {"n": len(ms), "mean": statistics.fmean(ms), "p50": q[9], "p95": q[18]}


def read_figures(before: dict, after: dict) -> dict:
    """A row's adapter reads from the replica's read log (stats before and after the row): the
    first read of an adapter on this replica (on an object store: its download) vs a read
    again after an eviction (on an object store: from the replica's local copy)."""
    n = after["adapter_reads"] - before["adapter_reads"]
    log = after["adapter_read_log"][-n:] if n > 0 else []
    seen = {k for k, _ in before["adapter_read_log"]}
    first, again = [], []
    for key, ms in log:
        (again if key in seen else first).append(ms)
        seen.add(key)
    return {"adapter_read_ms": summary(first + again), "first_read_ms": summary(first), "reread_ms": summary(again)}


def load_times(uris: dict[str, str], n: int) -> dict:
    """The time to load one adapter, one at a time with nothing else running, from each store
    (name -> URI), the same `n` adapters, the stores interleaved: what the replica's load does
    (DONE check, download to an empty local folder on an object store, spec, weights read)."""
    from safetensors.torch import load_file

    from genpi.serve.adapters import AdapterFiles, AdapterRef
    from genpi.store import Store

    stores = {k: Store(u, create=False) for k, u in uris.items()}
    reg = next(iter(stores.values())).registry()
    ids = sorted(reg)[:n]
    times: dict[str, list[float]] = {k: [] for k in stores}
    with tempfile.TemporaryDirectory(prefix="genpi-bench-load-") as tmp:
        files = {k: AdapterFiles(s, os.path.join(tmp, k)) for k, s in stores.items()}
        for i in ids:
            ref = AdapterRef(i, reg[i]["fingerprint"])
            for k, f in files.items():
                t0 = time.perf_counter()
                path = f.local_dir(ref)
                f.spec(ref)
                load_file(os.path.join(path, "adapter_model.safetensors"))
                times[k].append(1000 * (time.perf_counter() - t0))
    return {k: summary(v) for k, v in times.items()}


def print_reads(name: str, store: str, figures: dict) -> None:
    def fmt(s):
        return f"{s['mean']:.0f} ms mean, {s['p95']:.0f} ms p95 (n={s['n']})" if s else "none"

    print(f"  {name}: adapter reads from the {store} store, first read {fmt(figures['first_read_ms'])}; "
          f"read again {fmt(figures['reread_ms'])}")
