"""Both entry points are one pipeline: `genpi internalize` (in-process runner) and
jobs/internalize_many.py (Ray runner) write the same files from the same inputs; the store
is checked before anything starts; settings that change how, not what, redo nothing; the
skip path repairs the registry in both; read-only commands never create a store."""
from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genpi.cli import main
from genpi.config import load_config
from genpi.pipeline.run import internalize

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_OVERRIDES, TINY_SEEDS  # noqa: E402
from genpi.store import Store

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "internalize_many.py"
PROMPT = "You are a pirate. Always answer like a pirate and say Arr."

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _fp_dir(store: Path, pid: str = "pirate") -> Path:
    [d] = [p for p in (store / "prompts" / pid).iterdir() if p.is_dir()]
    return d


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` and everything under it read-only, also for root: chmod for users, the
    immutable attribute (chattr +i, ext4/xfs) for root, whom folder permissions do not stop."""
    dirs = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a filesystem without chattr +i: cannot make a read-only folder")
        cmd_off = [["chattr", "-i", str(folder)]]
        for d in dirs[1:]:
            subprocess.run(["chattr", "+i", str(d)], check=True)
            cmd_off.append(["chattr", "-i", str(d)])
        try:
            yield
        finally:
            for c in cmd_off:
                subprocess.run(c, check=False)
        return
    for d in dirs:
        d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        yield
    finally:
        for d in dirs:
            d.chmod(stat.S_IRWXU)


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_model_dir, ray_local):
    """One prompt published by the in-process runner and the same by the Ray runner."""
    root = tmp_path_factory.mktemp("entry")
    manifest = root / "m.yaml"
    manifest.write_text(f"- id: pirate\n  prompt: {json.dumps(PROMPT)}\n  seed_inputs: {json.dumps(TINY_SEEDS)}\n"
                        "  checks:\n    - {type: regex, name: arr, pattern: '(?i)arr'}\n", encoding="utf-8")
    # fp32 (train.autocast=off): the two runners' adapters are compared closely, which holds in
    # fp32 only (bf16 matmuls round differently under DeepSpeed's and plain torch's steps).
    overrides = [f"model.name={tiny_model_dir}", "train.autocast=off", *TINY_OVERRIDES]
    stores = {}
    for kind in ("local", "ray"):
        if kind == "ray":
            # The Ray run starts from the local run's synthesis. Greedy decoding on a random
            # tiny model flips on last-bit differences (thread count, padding of a batch), so
            # training and evaluation are compared on equal data; synthesis through Ray is the
            # same stage code (genpi.synth.stages), run by tests/test_synth_ray.py and
            # tests/test_internalize_many.py.
            import shutil

            src = _fp_dir(root / "local")
            shutil.copytree(src / "synth", root / "ray" / "prompts" / "pirate" / src.name / "synth")
        cfg = load_config(None, [*overrides, f"store={root / kind}"])
        assert internalize(str(manifest), cfg, kind) == 0
        stores[kind] = root / kind
    return {"manifest": manifest, "overrides": overrides, **stores}




def test_both_runners_write_the_same_artifacts(published):
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    local, ray_ = _fp_dir(published["local"]), _fp_dir(published["ray"])
    assert local.name == ray_.name, "the fingerprint depends on the runner"
    # One spec.json writer: both record the base model (serving checks it against the served base).
    spec_l, spec_r = (json.loads((d / "spec.json").read_text()) for d in (local, ray_))
    assert spec_l["config"].pop("store") != spec_r["config"].pop("store")  # the only difference
    assert spec_l == spec_r and spec_l["model"]
    assert pq.read_table(ray_ / "synth" / "to_be.parquet").to_pylist() == \
        pq.read_table(local / "synth" / "to_be.parquet").to_pylist()
    wl, wr = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (local, ray_))
    assert wl.keys() == wr.keys()
    for k in wl:  # one training loop; DeepSpeed's reduction order is the only difference
        torch.testing.assert_close(wl[k], wr[k], rtol=1e-3, atol=1e-5, msg=k)
    el, er = (json.loads((d / "eval.json").read_text()) for d in (local, ray_))
    assert el["metrics"]["kl"]["adapter"] == pytest.approx(er["metrics"]["kl"]["adapter"], rel=1e-2, abs=1e-4)
    rl, rr = (Store(published[k], create=False).registry()["pirate"] for k in ("local", "ray"))
    assert rl.keys() == rr.keys() and rl["kl_ratio"] == pytest.approx(rr["kl_ratio"], rel=1e-2, abs=1e-3)


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_execution_settings_redo_nothing_published(published, kind, capsys):
    store = published[kind]
    before = _tree(store / "prompts")
    how = ["train.pack_size=3", "train.zero_stage=1", "train.checkpoint_every_steps=7", "train.max_batch_tokens=999",
           "engine.batch_size=3", "cluster.synth_actors=2", "cluster.train_workers=2", "cluster.cpus_per_train_worker=2"]
    cfg = load_config(None, [*published["overrides"], *how, f"store={store}"])
    assert internalize(str(published["manifest"]), cfg, kind) == 0
    out = capsys.readouterr().out
    assert "0 new, 0 changed, 1 unchanged" in out and "nothing to do" in out
    assert _tree(store / "prompts") == before


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_skip_repairs_a_registry_left_pointing_elsewhere(published, kind, tmp_path, capsys):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(published[kind], store)
    record = store / "registry" / "pirate.json"
    reg = json.loads(record.read_text())
    fp = reg["fingerprint"]
    # A run killed between DONE and the registry update: the registry still names an older fingerprint.
    record.write_text(json.dumps({"id": "pirate", "fingerprint": "0123456789abcdef", "published_at": 0}))
    cfg = load_config(None, [*published["overrides"], f"store={store}"])
    assert internalize(str(published["manifest"]), cfg, kind) == 0
    repaired = Store(store, create=False).registry()["pirate"]
    assert repaired["fingerprint"] == fp and "kl_ratio" in repaired
    assert "1 unchanged (skipped)" in capsys.readouterr().out


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO, **kw)


@pytest.mark.parametrize("entry", ["cli", "job"])
@pytest.mark.parametrize("case", ["file", "read-only"])
def test_unusable_store_fails_before_anything_starts(published, entry, case, tmp_path):
    store = tmp_path / "store"
    if case == "file":
        store.write_text("not a store")
    else:
        store.mkdir()
    if entry == "cli":
        argv = [sys.executable, "-m", "genpi.cli", "internalize", str(published["manifest"]), "--store", str(store)]
    else:
        argv = [sys.executable, str(JOB), "--manifest", str(published["manifest"]), "--store", str(store)]
    with read_only(store) if case == "read-only" else contextlib.nullcontext():
        r = _run([*argv, *published["overrides"]])
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "store" in r.stderr and str(store) in r.stderr, r.stderr
    assert "Ray" not in r.stdout + r.stderr, "Ray started before the store was checked"
    if case == "file":
        assert store.read_text() == "not a store"
    else:
        assert not any(store.iterdir())


def test_nothing_to_do_succeeds_on_a_read_only_store(published, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(published["local"], store)
    with read_only(store):
        r = _run([sys.executable, "-m", "genpi.cli", "internalize", str(published["manifest"]), "--store", str(store),
                  *published["overrides"]])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "nothing to do" in r.stdout


def test_nothing_to_do_writes_nothing(published, capsys):
    store = published["local"]
    before = {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("*")}
    assert main(["internalize", str(published["manifest"]), "--store", str(store), *published["overrides"]]) == 0
    assert {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("*")} == before


@pytest.mark.parametrize("command", [["inspect"], ["chat", "pirate", "hi"], ["eval", "pirate"]])
def test_read_only_commands_do_not_create_the_store(command, tmp_path, capsys):
    store = tmp_path / "nowhere"
    rc = main([*command, "--store", str(store)])
    assert not store.exists()
    out, err = capsys.readouterr()
    if command == ["inspect"]:
        assert rc == 0 and "nothing published" in out
    else:
        assert rc == 2 and "no published adapter" in err


def test_version_and_help_texts(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and version("genpi") in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["internalize", "--help"])
    out = capsys.readouterr().out
    assert "single-machine path" in out and "jobs/internalize_many.py" in out
    r = _run([sys.executable, str(JOB), "--help"])
    assert r.returncode == 0
    for needle in ("key.sub=value", "Exit status: 0", "1 some prompts failed", "2 bad input"):
        assert needle in r.stdout, needle
    # Every argument and subcommand has help text.
    from genpi.cli import build_parser

    ap = build_parser()
    subs = next(a for a in ap._actions if a.dest == "cmd")
    for name, sub in subs.choices.items():
        assert any(c.dest == name and c.help for c in subs._choices_actions), name
        for action in sub._actions:
            assert action.help or action.dest == "help", f"genpi {name}: {action.dest} has no help"


def test_a_stage_the_cluster_cannot_run_fails_its_prompts_with_a_report(ray_local, tiny_overrides, write_manifest,
                                                                       tmp_path, capsys):
    """Engine actors asking for a GPU on a CPU-only Ray: synthesis fails every prompt with what
    is missing (named in the report), exit status 1, nothing published, no traceback."""
    store = tmp_path / "store"
    cfg = load_config(None, [*tiny_overrides, f"store={store}", "cluster.cpus_per_engine_actor=1",
                             "cluster.gpus_per_engine_actor=1"])
    assert internalize(str(write_manifest(PROMPT)), cfg, "ray") == 1
    out = capsys.readouterr().out
    assert "FAILED pirate (synth): ResourceError: synthesis needs an engine actor with 1 CPU and 1 GPU" in out
    [report] = (store / "runs").glob("*/report.json")
    [row] = json.loads(report.read_text())["prompts"]
    assert row["status"] == "failed" and row["failed_stage"] == "synth" and "cluster.gpus_per_engine_actor" in row["error"]
    assert not (store / "registry").exists() and not Store(store, create=False).registry()
