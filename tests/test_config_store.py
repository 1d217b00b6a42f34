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


# --------------------------------------------------------------------------- values as written (YAML 1.2)


def test_string_fields_get_the_text_written_in_overrides():
    # YAML 1.1 (PyYAML) made these False and the octal number 42798.
    cfg = load_config(None, ["train.pg_target=off", "model.revision=0123456", "eval.leak_probes=[no, 007, 1.50]"])
    assert cfg.train.pg_target == "off"
    assert cfg.model.revision == "0123456"
    assert cfg.eval.leak_probes == ["no", "007", "1.50"]
    cfg = load_config(None, ["model.name=2024", "serve.base_model_name=true", "synth.end_marker=1.0"])
    assert (cfg.model.name, cfg.serve.base_model_name, cfg.synth.end_marker) == ("2024", "true", "1.0")
    assert load_config(None, ["model.revision='0123456'"]).model.revision == "0123456"  # quoted: a string anyway


def test_string_fields_get_the_text_written_in_config_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {revision: 0123456}\ntrain:\n  pg_target: off\n  target_modules: [q_proj, 012]\n")
    cfg = load_config(p)
    assert cfg.model.revision == "0123456" and cfg.train.pg_target == "off"
    assert cfg.train.target_modules == ["q_proj", "012"]
    p.write_text("train.pg_target: off\nmodel.revision: 0123456\n")  # dotted keys in a file
    cfg = load_config(p)
    assert cfg.model.revision == "0123456" and cfg.train.pg_target == "off"


def test_zero_stage_3_is_refused_with_why():
    # Issue 14 defect 3: ZeRO-3 partitions parameters, which the packed optimizer, adapter
    # export and whole-base loading do not support: refused, never silently broken.
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.zero_stage=3"])
    assert "train.zero_stage" in str(e.value) and "not supported" in str(e.value)
    with pytest.raises(ConfigError, match="0, 1 or 2"):
        load_config(None, ["train.zero_stage=4"])
    assert load_config(None, ["train.zero_stage=0"]).train.zero_stage == 0


def test_max_ongoing_requests_must_exceed_the_autoscaling_target():
    """A replica that admits no more requests than the autoscaler's target never shows the
    backlog the autoscaler scales on: refused, naming both fields."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["serve.target_ongoing_requests=16", "serve.max_ongoing_requests=16"])
    assert "max_ongoing_requests" in str(e.value) and "target_ongoing_requests" in str(e.value)
    assert load_config(None, ["serve.target_ongoing_requests=16", "serve.max_ongoing_requests=17"])


def test_max_request_bytes_is_a_validated_serve_setting():
    assert load_config(None, []).serve.max_request_bytes == 1 << 20
    assert load_config(None, ["serve.max_request_bytes=4096"]).serve.max_request_bytes == 4096
    with pytest.raises(ConfigError, match="serve.max_request_bytes"):
        load_config(None, ["serve.max_request_bytes=10"])


def test_max_lora_rank_must_be_a_vllm_rank():
    # Issue 14 defect 8: vLLM accepts only a fixed set of max_lora_rank values.
    with pytest.raises(ConfigError) as e:
        load_config(None, ["serve.max_lora_rank=48"])
    assert "serve.max_lora_rank" in str(e.value) and "320" in str(e.value)
    assert load_config(None, ["serve.max_lora_rank=32"]).serve.max_lora_rank == 32


def test_typed_fields_still_parse(tmp_path):
    args = ["train.epochs=3", "train.lr=1e-3", "train.zero_stage=1", "synth.reasons=false",
            "model.max_context=null", "cluster.gpus_per_train_worker=0.5", "train.early_stop_patience=0x2",
            "model.revision=null", "serve.enable_prefix_caching=FALSE"]
    p = tmp_path / "c.yaml"
    p.write_text("\n".join(a.replace("=", ": ", 1) for a in args) + "\n")
    for cfg in (load_config(None, args), load_config(p)):
        assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
        assert cfg.train.lr == 0.001  # YAML 1.1 read 1e-3 as a string
        assert cfg.train.zero_stage == 1 and cfg.train.early_stop_patience == 2
        assert cfg.synth.reasons is False and cfg.serve.enable_prefix_caching is False
        assert cfg.model.max_context is None and cfg.model.revision is None
        assert cfg.cluster.gpus_per_train_worker == 0.5
    # Words that YAML 1.1 read as booleans still set a bool field (pydantic reads them).
    assert load_config(None, ["synth.reasons=off"]).synth.reasons is False
    assert load_config(None, ["synth.reasons=yes"]).synth.reasons is True


def test_yaml_core_schema():
    import yaml

    from genpi.yamlio import Scalar, YamlLoader, typed

    def load(text):
        return typed(yaml.load(text, Loader=YamlLoader))  # noqa: S506 - a SafeLoader

    for word in ["yes", "no", "on", "off", "y", "n", "2024-01-01", "1_000", "0b11", "1:30", ".hidden", "nullable"]:
        assert load(word) == word, word
    assert [load(t) for t in ["true", "False", "0123", "-7", "0o17", "0x1F", "1.5", "1e-3", "-.inf", "~", "null"]] == [
        True, False, 123, -7, 15, 31, 1.5, 0.001, float("-inf"), None, None]
    assert yaml.load("v: 0123", Loader=YamlLoader) == {"v": Scalar("0123", 123)}  # noqa: S506
    assert load("a: &base {x: 1, y: 2}\nb:\n  <<: *base\n  y: 3\n")["b"] == {"x": 1, "y": 3}
    with pytest.raises(yaml.YAMLError, match="duplicate key 'x'"):
        load("x: 1\nx: 2\n")


def test_config_file_duplicate_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'epochs'"):
        load_config(p)


# --------------------------------------------------------------------------- every problem at once


def test_all_override_problems_listed_at_once():
    args = ["train.epoch=3", "train.epochs=-1", "trian.epochs=3", "train.epochs", "train.pg_target=sometimes",
            "synth.seed=1"]
    with pytest.raises(ConfigError) as e:
        load_config(None, args)
    lines = str(e.value).splitlines()
    assert len(lines) == 5, lines
    for needle in ["unknown config key 'train.epoch'", "unknown config key 'trian'", "not of the form key.sub=value",
                   "field 'train.epochs'", "field 'train.pg_target'"]:
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    with pytest.raises(ConfigError) as e:
        GenpiConfig().with_overrides({"train": {"epoch": 3, "epochs": 0}, "synth.sed": 1})
    assert len(str(e.value).splitlines()) == 3


def test_all_config_file_problems_listed_at_once(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lerning_rate: 0.1\n  epochs: 0\nsynth: {sed: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and all(line.startswith(str(p)) for line in lines), lines
    assert "train.lerning_rate" in lines[0] and "synth.sed" in lines[1] and "train.epochs" in lines[2]


# --------------------------------------------------------------------------- fingerprints hold content only

# Settings that change how a stage runs, never what it produces (issue 13).
HOW_SETTINGS = {
    "train.pack_size": 1,
    "train.zero_stage": 1,
    "train.checkpoint_every_steps": 7,
    "train.max_batch_tokens": 512,
}
STAGES = ("model", "engine", "synth", "train", "eval")


def test_execution_settings_leave_every_stage_dict_unchanged():
    from genpi.config import HOW_NOT_WHAT

    base = GenpiConfig()
    assert {f"{s}.{k}" for s, keys in HOW_NOT_WHAT.items() for k in keys} >= set(HOW_SETTINGS)
    for key, value in HOW_SETTINGS.items():
        changed = base.with_overrides({key: value})
        section, field = key.split(".")
        assert getattr(getattr(changed, section), field) != getattr(getattr(base, section), field), key
        for stage in STAGES:
            assert changed.stage_dict(stage) == base.stage_dict(stage), (key, stage)
    # Every excluded name is a real field (a typo would exclude nothing) ...
    for section, keys in HOW_NOT_WHAT.items():
        assert keys <= set(type(getattr(base, section)).model_fields), section
    # ... and content still counts.
    for key, value in {"train.lr": 1e-4, "train.batch_size": 4, "synth.seed": 1, "eval.max_new_tokens": 7}.items():
        section = key.split(".")[0]
        assert base.with_overrides({key: value}).stage_dict(section) != base.stage_dict(section), key


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
    assert sorted(Store(tmp_path / "s", create=False).registry()) == sorted(ids)


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


def test_registry_keeps_every_entry_of_two_publishers_on_s3(s3_server, tmp_path):
    """Two jobs publishing into one bucket at once (a real S3 server on 127.0.0.1): a shared
    registry file read-modify-written by both loses entries; one record per prompt does not."""
    import subprocess
    import sys

    aws = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": s3_server,
           "AWS_DEFAULT_REGION": "us-east-1"}
    code = ("import sys\nfrom genpi.store import Store\nst = Store('s3://genpi-test/store')\n"
            "for i in range(25):\n    st.publish(f'{sys.argv[1]}{i}', '0123456789abcdef', {'kl_ratio': 0.5})\n")
    jobs = [subprocess.Popen([sys.executable, "-c", code, name], env={**os.environ, **aws}) for name in ("a", "b")]
    assert [j.wait(timeout=120) for j in jobs] == [0, 0]
    os.environ.update(aws)  # the s3_server fixture restores the environment
    reg = Store("s3://genpi-test/store", create=False).registry()
    assert sorted(reg) == sorted(f"{n}{i}" for n in "ab" for i in range(25))
    assert all(e["fingerprint"] == "0123456789abcdef" and e["kl_ratio"] == 0.5 for e in reg.values())


def test_registry_reads_records_over_an_old_registry_file(tmp_path):
    """Stores written before the per-prompt records keep their entries; a record replaces one."""
    st = Store(tmp_path / "s")
    st.write_json(st.path("registry.json"), {"old": {"fingerprint": "1" * 16}, "moved": {"fingerprint": "2" * 16}})
    st.publish("moved", "3" * 16)
    reg = st.registry()
    assert reg["old"]["fingerprint"] == "1" * 16 and reg["moved"]["fingerprint"] == "3" * 16
    # A changed record is re-read (the cache follows versions), a removed one disappears.
    st.publish("moved", "4" * 16)
    assert st.registry()["moved"]["fingerprint"] == "4" * 16
    os.remove(st.registry_record("moved"))
    assert st.registry()["moved"]["fingerprint"] == "2" * 16
