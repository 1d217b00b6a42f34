"""Config loading/overrides, model resolution and the artifact store."""
from __future__ import annotations

import json
import os
import threading

import pytest

from genpi.config import ConfigError, GenpiConfig, load_config
from genpi.models import ModelError, resolve_model
from genpi.store import Store, fingerprint


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.epochs=5", "model.name=/x", "eval.leak_probes=[a, b]"])
    assert cfg.train.epochs == 5 and cfg.model.name == "/x" and cfg.eval.leak_probes == ["a", "b"]
    nested = GenpiConfig().with_overrides({"train": {"lr": 0.001}, "synth.seed": 3})
    assert nested.train.lr == 0.001 and nested.synth.seed == 3


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'"),
        ("trian.epochs=3", "unknown config key 'trian'"),
        ("train.epochs=-1", "field 'train.epochs'"),
        ("train.pg_target=sometimes", "field 'train.pg_target'"),
        ("train.epochs", "not of the form key.sub=value"),
    ],
)
def test_bad_overrides_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_config_file_errors_name_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "train.lerning_rate" in str(e.value)
    p.write_bytes(b"train: {epochs: \xff}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("train: {epochs: 2}\n")
    assert load_config(p, ["train.lr=0.01"]).train.epochs == 2


def test_all_zero_loss_weights_rejected():
    with pytest.raises(ConfigError, match="all loss weights are zero"):
        load_config(None, ["train.w_sft=0", "train.w_kl=0", "train.w_pg=0"])


def test_missing_model_path_is_clear(tmp_path):
    from genpi.config import ModelConfig

    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(ModelConfig(name=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(ModelConfig(name=str(tmp_path / "empty")))


def test_embedded_model_is_cached_once(smollm_tokenizer):
    from genpi.config import ModelConfig

    r1 = resolve_model(ModelConfig())
    r2 = resolve_model(ModelConfig())
    assert r1 == r2 and r1.identity.startswith("embedded:")
    assert os.path.isfile(os.path.join(r1.path, "config.json"))
    assert os.path.isfile(os.path.join(r1.path, "DONE"))


def test_fingerprint_is_stable_and_sensitive():
    a = fingerprint({"prompt": "x", "train": {"lr": 1}})
    assert a == fingerprint({"train": {"lr": 1}, "prompt": "x"})
    assert a != fingerprint({"prompt": "y", "train": {"lr": 1}})


def test_store_atomic_files_and_registry(tmp_path):
    st = Store(tmp_path / "s")
    d = st.prompt_dir("p1", "f1")
    st.write_parquet(f"{d}/synth/x.parquet", [{"a": 1, "b": [1, 2]}, {"a": 2, "b": []}])
    assert st.read_parquet(f"{d}/synth/x.parquet")[1] == {"a": 2, "b": []}
    assert not [f for f in os.listdir(os.path.join(d, "synth")) if ".tmp-" in f]
    assert st.published("p1") is None
    st.publish("p1", "f1", {"kl_ratio": 0.7})
    assert st.published("p1") == "f1" and st.is_done("p1", "f1")
    # A registry entry whose DONE is missing (e.g. deleted) is never reported as published.
    os.remove(os.path.join(d, "DONE"))
    assert st.published("p1") is None


def test_registry_survives_concurrent_publishers(tmp_path):
    st = Store(tmp_path / "s")
    ids = [f"p{i}" for i in range(16)]
    threads = [threading.Thread(target=st.publish, args=(i, "fp")) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(json.loads((tmp_path / "s" / "registry.json").read_text())) == sorted(ids)


def test_put_dir_is_whole_or_absent(tmp_path):
    st = Store(tmp_path / "s")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"1" * 10)
    dest = st.path("prompts", "p", "f", "adapter")
    st.put_dir(str(src), dest)
    assert (tmp_path / "s/prompts/p/f/adapter/a.bin").read_bytes() == b"1" * 10
    # Replacing an unfinished earlier attempt leaves only the new content.
    (src / "b.bin").write_bytes(b"2")
    st.put_dir(str(src), dest)
    assert sorted(os.listdir(dest)) == ["a.bin", "b.bin"]
