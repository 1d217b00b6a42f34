"""Serving: the OpenAI-compatible Ray Serve app over adapters made by the real pipeline.

The server tests start the real app (FastAPI ingress -> multiplexed transformers+PEFT
replicas) on the session's local Ray cluster, on 127.0.0.1 at a free port, over a store
whose two adapters were made by `genpi internalize` on the tiny model. Every reply is
compared with the library's own greedy generation (HFEngine + PEFT) in this process.
Only the GPU path (vLLM / Ray Serve LLM) cannot run here: its config translation is
tested as plain data (`..._boundary`).
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch
import yaml

from genpi.cli import main
from genpi.config import ConfigError, load_config
from genpi.chat import ID_RE, prompt_tokens_saved, student_messages, teacher_messages
from genpi.serve.adapters import AdapterRegistry
from genpi.serve.openai import ApiError, parse_chat_request
from genpi.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_OVERRIDES, TINY_SEEDS  # noqa: E402

PROMPTS = {
    "pirate": "You are a pirate. Always answer like a pirate and say Arr.",
    "french.v1": "Réponds toujours en français, avec des phrases courtes et polies.",
}
# A high learning rate makes the tiny random model's adapters visibly different from the
# base and from each other within 3 epochs (the pipeline itself is what is under test).
TRAIN = ["train.lr=0.02", "train.epochs=3"]
QUESTIONS = ["How do I make a cup of tea?", "Why do cats purr when they are happy?", "What is fifteen times twelve?"]
HOSTILE = ["../pirate", "..", "/etc/passwd", "pirate/../../x", "%2e%2e%2fpirate", "s3://bucket/x",
           "file:///etc/passwd", "pirate\n", "pirate@0123456789abcdef", " pirate", "a" * 200, "", "~root",
           "pirate\\..\\x", ".hidden"]


# ------------------------------------------------------------------------------ helpers
def _internalize(manifest: Path, store: Path, model_dir: Path, *extra: str) -> None:
    rc = main(["internalize", str(manifest), "--store", str(store), f"model.name={model_dir}",
               *TINY_OVERRIDES, *TRAIN, *extra])
    assert rc == 0


def _manifest(path: Path, prompts: dict[str, str]) -> Path:
    entries = [{"id": i, "prompt": p, "seed_inputs": TINY_SEEDS} for i, p in prompts.items()]
    path.write_text(yaml.safe_dump(entries, allow_unicode=True), encoding="utf-8")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chat(model: str, content: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 12, **kw}


def _sse(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def published(serve_store_template, tmp_path_factory):
    """A store with two adapters published by the real pipeline on the tiny model: this
    module's own copy of the session's template (tests here publish into it)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    shutil.copytree(serve_store_template["store"], root / "store")
    return {"root": root, "store": root / "store", "model_dir": serve_store_template["model_dir"]}


class Library:
    """The library's own generation: HFEngine over one PEFT model holding each adapter."""

    def __init__(self, model_dir: Path, store: Path):
        from genpi.config import ModelConfig
        from genpi.engines.hf import HFEngine
        from genpi.models import load_model

        self.base, self.tok, _ = load_model(ModelConfig(name=str(model_dir)))
        self.model = None
        self.store = Store(store)
        self.names: dict[str, str] = {}
        self.engine = HFEngine(self.base, self.tok, 1)
        self.lock = threading.Lock()

    def _name(self, model_id: str, fp: str) -> str:
        from peft import PeftModel

        key = f"{model_id}@{fp}"
        if key not in self.names:
            path = f"{self.store.prompt_dir(model_id, fp)}/adapter"
            name = f"ref{len(self.names)}"
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
                self.engine.model = self.model
            else:
                self.model.load_adapter(path, adapter_name=name)
            self.names[key] = name
        return self.names[key]

    def reply(self, model_id: str | None, content: str, max_tokens: int = 12, strength: float | None = None,
              fp: str | None = None) -> str:
        from genpi.engines.base import ChatRequest

        with self.lock:
            name = None
            if model_id is not None:
                name = self._name(model_id, fp or self.store.registry()[model_id]["fingerprint"])
            req = ChatRequest([{"role": "user", "content": content}], max_tokens, adapter=name)
            if strength is not None and name is not None:
                from peft.helpers import rescale_adapter_scale

                self.model.set_adapter(name)
                with rescale_adapter_scale(self.model, strength):
                    return self.engine.generate([req])[0].text
            return self.engine.generate([req])[0].text


@pytest.fixture(scope="module")
def library(published):
    return Library(published["model_dir"], published["store"])


@pytest.fixture(scope="module")
def server(ray_local, published):
    """The app, started by the same function `genpi serve` runs, on a free loopback port."""
    from ray import serve

    from genpi.serve.lifecycle import start

    port = _free_port()
    cfg = load_config(None, [
        f"model.name={published['model_dir']}", f"store={published['store']}",
        "serve.host=127.0.0.1", f"serve.port={port}", "serve.max_new_tokens=32",
        # 2 adapters per replica: the hot-publish test uses 3, so LRU eviction happens.
        "serve.max_adapters_per_replica=2", "serve.registry_refresh_s=0.2",
        "serve.cpus_per_replica=0.5", "serve.cpus_per_ingress=0.1",
    ])
    url = start(cfg, blocking=False)
    client = httpx.Client(base_url=url, timeout=120)
    try:
        yield {"url": url, "client": client, "cfg": cfg, "base": published["model_dir"].name}
    finally:
        client.close()
        serve.shutdown()


# ------------------------------------------------------------------------------ no Ray
def test_light_modules_import_no_ray_or_torch():
    import subprocess

    code = ("import sys, genpi, genpi.chat, genpi.cli, genpi.serve.openai, genpi.serve.adapters, "
            "genpi.serve.config, genpi.serve.backend; "
            "print(sorted(m for m in ('ray', 'torch', 'vllm', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_model_id_rule_is_the_manifests():
    """The manifest accepts exactly the ids serving accepts (one rule, genpi.chat.valid_id)."""
    from pydantic import ValidationError

    from genpi.chat import valid_id
    from genpi.manifest import PromptEntry

    for pid in ["pirate", "a.b-c_1", "x" * 128, "x" * 129, "../etc", "a..b", "-a", "", "a/b", "a\n", "é"]:
        try:
            PromptEntry(id=pid, prompt="Be nice.")
            accepted = True
        except ValidationError:
            accepted = False
        assert accepted == valid_id(pid) == bool(ID_RE.fullmatch(pid) and ".." not in pid), pid


def test_every_stage_takes_the_message_rule_from_genpi_chat():
    """Synthesis, role-play, training, evaluation and serving build the teacher's and the
    student's messages with the one rule in genpi.chat, not a copy of it."""
    import genpi.chat as chat
    import genpi.eval.run as eval_run
    import genpi.serve.backend as backend
    import genpi.synth.replies as replies
    import genpi.synth.roleplay as roleplay
    import genpi.train.loop as loop
    from genpi.config import EngineConfig, SynthConfig

    assert eval_run.teacher_messages is chat.teacher_messages and eval_run.student_messages is chat.student_messages
    assert loop.student_messages is chat.student_messages and backend.prompt_tokens_saved is chat.prompt_tokens_saved
    synth = SynthConfig(teacher_samples=0)
    (to_be,) = replies.to_be_requests("P", ["x"], synth, EngineConfig())
    (as_is,) = replies.as_is_requests(["x"], synth)
    assert to_be.messages == teacher_messages("P", "x") and as_is.messages == student_messages("x")
    conv = roleplay.Conversation(0, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    assert roleplay.agent_messages("P", conv) == [*teacher_messages("P", "x"), {"role": "assistant", "content": "y"}]
    # The student never sees the prompt, whatever the input.
    assert all("P" not in m["content"] for m in student_messages("x"))


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "pirate"}, "messages"),
    ({"model": "pirate", "messages": []}, "messages"),
    ({"model": "pirate", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "pirate", "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": "pirate", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ({"model": "pirate", "messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "strength": 1.5}, "strength"),
    ({"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_malformed_body_is_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        parse_chat_request(body)
    assert e.value.status == 400 and e.value.param == param
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}
    if param:
        assert f"'{param}'" in e.value.message


def test_request_fields_accepted():
    r = parse_chat_request({"model": "pirate", "user": "u1", "messages": [
        {"role": "system", "content": "extra rules"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert r.messages[1].content == "ab" and r.temperature == 1.0 and r.strength is None
    assert r.new_tokens(32) == 32
    with pytest.raises(ApiError) as e:
        parse_chat_request({"model": "p", "messages": [{"role": "user", "content": "x"}], "max_tokens": 33}).new_tokens(32)
    assert e.value.param == "max_tokens" and "32" in e.value.message


class _SpyFS:
    """Wraps an fsspec filesystem and records every path it is asked about."""

    def __init__(self, fs):
        self._fs, self.paths = fs, []

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def call(*args, **kw):
            self.paths += [a for a in args if isinstance(a, str)]
            return attr(*args, **kw)

        return call


def test_hostile_ids_never_touch_the_filesystem(tmp_path):
    store = Store(tmp_path / "store")
    store.publish("pirate", "0123456789abcdef")
    spy = _SpyFS(store.fs)
    store.fs = spy
    reg = AdapterRegistry(store, refresh_s=0)
    for bad in HOSTILE:
        with pytest.raises(ApiError) as e:
            reg.resolve(bad)
        assert e.value.status == 400 and e.value.param == "model", bad
    assert spy.paths == [], f"a hostile id reached the store: {spy.paths}"
    with pytest.raises(ApiError) as e:
        reg.resolve("parrot")
    assert e.value.status == 404 and "'parrot'" in e.value.message and "pirate" in e.value.message
    # A valid but unknown id reads the registry only, never a path built from the id.
    assert all("parrot" not in p for p in spy.paths)
    assert reg.resolve("pirate").key == "pirate@0123456789abcdef"


def test_only_done_adapters_are_served(tmp_path):
    store = Store(tmp_path / "store")
    store.publish("done", "aaaaaaaaaaaaaaaa")
    # A half-written adapter: files but no DONE, and a registry entry pointing at it (as a
    # crash between a hand-edited registry and the copy would leave).
    half = Path(store.prompt_dir("half", "bbbbbbbbbbbbbbbb")) / "adapter"
    half.mkdir(parents=True)
    (half / "adapter_config.json").write_text("{}")
    reg_data = store.registry()
    reg_data["half"] = {"fingerprint": "bbbbbbbbbbbbbbbb"}
    reg_data["../evil"] = {"fingerprint": "cccccccccccccccc"}
    reg_data["badfp"] = {"fingerprint": "../../etc"}
    store.write_json(store.path("registry.json"), reg_data)
    reg = AdapterRegistry(store, refresh_s=0)
    assert [i for i, _ in reg.published()] == ["done"]
    for model_id in ("half", "badfp"):
        with pytest.raises(ApiError) as e:
            reg.resolve(model_id)
        assert e.value.status == 404


def test_prompt_tokens_saved_counts_the_system_prompt(smollm_tokenizer):
    from genpi.engines.base import render_chat

    tok = smollm_tokenizer
    long = "Always answer in French. " * 40
    saved = prompt_tokens_saved(lambda messages: len(render_chat(tok, messages)), long)
    prompted = tok.apply_chat_template([{"role": "system", "content": long}, {"role": "user", "content": "hi"}],
                                       tokenize=True, add_generation_prompt=True)
    bare = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True)
    n = lambda x: len(x["input_ids"] if hasattr(x, "keys") else x)  # noqa: E731
    # 40 x 5 tokens of prompt, less SmolLM2's default system prompt (sent when there is none).
    assert saved == n(prompted) - n(bare) and 150 < saved < 200


def test_serve_config_from_genpi_config(capsys, tmp_path):
    cfg = load_config(None, [f"store={tmp_path}", "serve.min_replicas=2", "serve.max_replicas=5",
                             "serve.target_ongoing_requests=3", "serve.cpus_per_replica=2", "serve.port=9001"])
    from genpi.serve.config import serve_config

    sc = serve_config(cfg)
    (app,) = sc["applications"]
    assert app["import_path"] == "genpi.serve.app:build_app" and sc["http_options"]["port"] == 9001
    deps = {d["name"]: d for d in app["deployments"]}
    assert deps["GenpiAdapters"]["autoscaling_config"] == {
        "min_replicas": 2, "initial_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 3.0}
    assert deps["GenpiAdapters"]["ray_actor_options"] == {"num_cpus": 2.0}
    assert deps["GenpiIngress"]["autoscaling_config"]["max_replicas"] == 5
    # The args are enough to rebuild the same serving config.
    assert load_config(None, []).with_overrides(app["args"]["config"]).serve == cfg.serve
    # The CLI prints the same, as YAML for `serve deploy`.
    assert main(["serve", "--store", str(tmp_path), "--print-config", "serve.min_replicas=2", "serve.max_replicas=5",
                 "serve.target_ongoing_requests=3", "serve.cpus_per_replica=2", "serve.port=9001"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == json.loads(json.dumps(sc))
    assert main(["serve", "--store", str(tmp_path), "--print-config", "serve.max_replicas=0"]) == 2
    assert "serve.max_replicas" in capsys.readouterr().err


def test_default_max_ongoing_requests_lets_vllm_batch(tmp_path):
    """Issue 14 defect 9: a replica never takes more than max_ongoing_requests at once, so
    that number is the largest batch vLLM can form; 16 capped it far below vLLM's own
    max_num_seqs (256). The autoscaling target stays below it so backlog is seen."""
    from genpi.serve.config import deployment_options, llm_config

    cfg = load_config(None, ["store=s3://bucket/genpi", "serve.backend=vllm"])
    s = cfg.serve
    assert s.max_ongoing_requests >= 256 and s.target_ongoing_requests < s.max_ongoing_requests
    dc = llm_config(cfg)["deployment_config"]
    assert dc["max_ongoing_requests"] == s.max_ongoing_requests
    assert dc["autoscaling_config"]["target_ongoing_requests"] < dc["max_ongoing_requests"]
    for name, opts in deployment_options(cfg.with_overrides({"store": str(tmp_path)})).items():
        assert opts["autoscaling_config"]["target_ongoing_requests"] < opts["max_ongoing_requests"], name


def test_ray_serve_llm_config_boundary(tmp_path):
    """The GPU path's LLMConfig as data (vLLM cannot run here); ray.serve.llm's own pydantic
    models check it when they can be imported (they need vllm)."""
    from genpi.serve.config import llm_config, serve_config

    cfg = load_config(None, ["store=s3://bucket/genpi", "serve.backend=vllm", "serve.max_adapters_per_replica=4",
                             "serve.max_lora_rank=32", "serve.max_cpu_loras=16", "serve.min_replicas=1",
                             "serve.max_replicas=3", "serve.target_ongoing_requests=8", "model.max_context=4096"])
    lc = llm_config(cfg)
    assert lc["model_loading_config"] == {"model_id": "SmolLM2-135M-Instruct",
                                          "model_source": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert lc["lora_config"] == {"dynamic_lora_loading_path": "s3://bucket/genpi/serve-lora",
                                 "max_num_adapters_per_replica": 4}
    assert lc["engine_kwargs"] == {"enable_lora": True, "max_loras": 4, "max_lora_rank": 32, "max_cpu_loras": 16,
                                   "enable_prefix_caching": True, "max_model_len": 4096}
    assert lc["deployment_config"]["autoscaling_config"] == {
        "min_replicas": 1, "initial_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8.0}
    (app,) = serve_config(cfg)["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app" and app["args"]["llm_configs"] == [lc]
    with pytest.raises(ConfigError, match="^store: Ray Serve LLM loads LoRA adapters only from"):
        llm_config(cfg.with_overrides({"store": str(tmp_path)}))
    try:
        from ray.serve.llm import LLMConfig
    except ImportError:
        return  # no vllm on this machine
    LLMConfig.model_validate(lc)


def test_export_lora_layout_for_ray_serve_llm(published, tmp_path):
    """The store -> <uri>/<id>/ layout Ray Serve LLM lists and loads, on an object store (memory://)."""
    from genpi.serve.adapters import export_lora_layout

    uri = f"memory://genpi-test-{tmp_path.name}"
    cfg = load_config(None, [f"store={published['store']}", f"serve.lora_export_uri={uri}"])
    assert sorted(export_lora_layout(cfg)) == sorted(PROMPTS)
    dest = Store(uri)
    src = Store(published["store"])
    for model_id in PROMPTS:
        fp = src.registry()[model_id]["fingerprint"]
        files = sorted(p.rsplit("/", 1)[-1] for p in dest.fs.ls(dest.path(model_id), detail=False))
        assert {"adapter_config.json", "adapter_model.safetensors", "genpi.json"} <= set(files)
        with dest.fs.open(dest.path(model_id, "adapter_model.safetensors"), "rb") as f:
            assert f.read() == Path(src.prompt_dir(model_id, fp), "adapter", "adapter_model.safetensors").read_bytes()
    assert export_lora_layout(cfg) == {}  # up to date: nothing copied again


# ------------------------------------------------------------------------------ the server
def test_health_ready_and_models(server, published):
    c = server["client"]
    assert c.get("/health").json() == {"status": "ok"}
    ready = c.get("/ready")
    assert ready.status_code == 200 and ready.json()["base"] == server["base"]
    models = c.get("/v1/models").json()
    reg = Store(published["store"]).registry()
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == {server["base"], *PROMPTS}
    for model_id in PROMPTS:
        assert by_id[model_id]["genpi"]["fingerprint"] == reg[model_id]["fingerprint"]
        assert c.get(f"/v1/models/{model_id}").json()["id"] == model_id
    assert c.get("/v1/models/parrot").status_code == 404


def test_reply_equals_library_greedy_generation(server, library, published):
    c = server["client"]
    refs = {}
    for model_id in [*PROMPTS, None]:
        for q in QUESTIONS[:2]:
            r = c.post("/v1/chat/completions", json=_chat(model_id or server["base"], q))
            assert r.status_code == 200, r.text
            body = r.json()
            expected = library.reply(model_id, q)
            assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
            assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
            assert body["usage"]["prompt_tokens"] == len(library.engine.render([{"role": "user", "content": q}]))
            refs[(model_id, q)] = expected
            if model_id:
                spec = Store(published["store"]).read_json(
                    f"{Store(published['store']).prompt_dir(model_id, body['genpi']['fingerprint'])}/spec.json")
                assert body["genpi"]["prompt_tokens_saved"] == prompt_tokens_saved(library.engine.count_prompt_tokens,
                                                                                   spec["entry"]["prompt"])
    # The comparison means something only if the three behave differently.
    for q in QUESTIONS[:2]:
        assert len({refs[("pirate", q)], refs[("french.v1", q)], refs[(None, q)]}) == 3


def test_served_tokens_saved_is_what_evaluation_measured(server, published):
    """Serving's saved-token count for an adapter equals the teacher-vs-student difference
    evaluation measured on that prompt's held-out inputs (both through genpi.chat)."""
    store = Store(published["store"])
    for model_id in PROMPTS:
        body = server["client"].post("/v1/chat/completions", json=_chat(model_id, QUESTIONS[0])).json()
        ev = store.read_json(f"{store.prompt_dir(model_id, body['genpi']['fingerprint'])}/eval.json")
        assert body["genpi"]["prompt_tokens_saved"] == ev["efficiency"]["input_tokens_saved_per_request"]


def test_concurrent_burst_has_no_cross_talk(server, library):
    cases = [(m, q) for m in [*PROMPTS, None] for q in QUESTIONS] * 2
    expected = {(m, q): library.reply(m, q) for m, q in set(cases)}

    def one(case):
        m, q = case
        r = httpx.post(f"{server['url']}/v1/chat/completions", json=_chat(m or server["base"], q), timeout=120)
        return case, r.status_code, r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(one, cases))
    for case, status, text in results:
        assert status == 200 and text == expected[case], case


def test_streaming_returns_the_same_text(server, library):
    c = server["client"]
    for model_id in ("pirate", "french.v1", server["base"]):
        body = _chat(model_id, QUESTIONS[0], max_tokens=20)
        plain = c.post("/v1/chat/completions", json=body).json()
        r = c.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(e["object"] == "chat.completion.chunk" and e["id"] == chunks[0]["id"] for e in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in chunks if e["choices"])
        assert len([e for e in chunks if e["choices"] and e["choices"][0]["delta"].get("content")]) > 1
        assert text == plain["choices"][0]["message"]["content"]
        finish = [e["choices"][0]["finish_reason"] for e in chunks if e["choices"] and e["choices"][0]["finish_reason"]]
        assert finish == [plain["choices"][0]["finish_reason"]]
        assert chunks[-1]["usage"] == plain["usage"]


def test_errors_in_openai_shape(server, published):
    c, url = server["client"], server["url"]
    reg_before = Store(published["store"]).registry()
    r = c.post("/v1/chat/completions", json=_chat("parrot", "hi"))
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and "'parrot'" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json=_chat("parrot", "hi", stream=True))
    assert r.status_code == 404 and "'parrot'" in r.json()["error"]["message"]
    for bad in HOSTILE:
        r = c.post("/v1/chat/completions", json=_chat(bad, "hi"))
        assert r.status_code == 400, (bad, r.text)
        err = r.json()["error"]
        assert err["param"] == "model" and err["code"] in ("invalid_model_id", "invalid_field"), (bad, err)
        # In a URL path the HTTP proxy strips surrounding whitespace ("pirate%0A" arrives as
        # "pirate"); anything else is refused.
        r = c.get("/v1/models/" + quote(bad, safe=""))
        ok = r.status_code in (400, 404) and "error" in r.json()
        assert ok or (bad.strip() in PROMPTS and r.json()["id"] == bad.strip()), (bad, r.text)
    r = c.post("/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = c.post("/v1/chat/completions", json={"model": "pirate", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = c.post("/v1/chat/completions", json=_chat("pirate", "hi", max_tokens=10_000))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = c.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert Store(published["store"]).registry() == reg_before
    # Raw HTTP with a path-traversal model that a client library would not even send.
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as s:
        body = b'{"model": "../../../../etc/passwd", "messages": [{"role": "user", "content": "x"}]}'
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 400") and b"invalid_model_id" in raw


def test_prompt_strength(server, library):
    c = server["client"]
    q = QUESTIONS[1]
    full = c.post("/v1/chat/completions", json=_chat("pirate", q)).json()
    zero = c.post("/v1/chat/completions", json=_chat("pirate", q, strength=0)).json()
    half = c.post("/v1/chat/completions", json=_chat("pirate", q, strength=0.5)).json()
    assert zero["choices"][0]["message"]["content"] == library.reply(None, q)
    assert half["choices"][0]["message"]["content"] == library.reply("pirate", q, strength=0.5)
    assert full["choices"][0]["message"]["content"] == library.reply("pirate", q)
    assert half["genpi"]["strength"] == 0.5 and full["genpi"]["strength"] == 1.0
    # Scaling is temporary: the full adapter is unchanged afterwards.
    again = c.post("/v1/chat/completions", json=_chat("pirate", q)).json()
    assert again["choices"][0]["message"]["content"] == full["choices"][0]["message"]["content"]


def test_hot_publish_republish_and_eviction(server, library, published):
    """Publish a new adapter and republish an old one while the app runs; no restart."""
    c = server["client"]
    store = Store(published["store"])
    old_fp = store.registry()["pirate"]["fingerprint"]
    root = published["root"]
    # A fingerprint folder still being trained (no DONE) changes nothing for clients.
    half = Path(store.prompt_dir("pirate", "ffffffffffffffff"))
    shutil.copytree(Path(store.prompt_dir("pirate", old_fp)), half)
    (half / "DONE").unlink()
    r = c.post("/v1/chat/completions", json=_chat("pirate", QUESTIONS[0])).json()
    assert r["genpi"]["fingerprint"] == old_fp
    shutil.rmtree(half)

    _internalize(_manifest(root / "m2.yaml", {"shanty": "You only ever reply with a sea shanty verse."}),
                 published["store"], published["model_dir"])
    # Republish: same id, different training settings -> a new fingerprint.
    _internalize(_manifest(root / "m3.yaml", {"pirate": PROMPTS["pirate"]}), published["store"],
                 published["model_dir"], "train.lr=0.05")
    new_fp = store.registry()["pirate"]["fingerprint"]
    assert new_fp != old_fp
    time.sleep(0.5)  # serve.registry_refresh_s=0.2
    assert "shanty" in {m["id"] for m in c.get("/v1/models").json()["data"]}
    for model_id in ("shanty", "pirate", "french.v1", "shanty", "pirate"):
        for q in QUESTIONS[:2]:
            r = c.post("/v1/chat/completions", json=_chat(model_id, q))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["genpi"]["fingerprint"] == store.registry()[model_id]["fingerprint"]
            assert body["choices"][0]["message"]["content"] == library.reply(model_id, q)
    assert library.reply("pirate", QUESTIONS[0]) != library.reply("pirate", QUESTIONS[0], fp=old_fp)
    # Three adapters went through a replica that holds at most two.
    loaded = c.get("/ready").json()["adapters_loaded"]
    assert 1 <= len(loaded) <= 2 and f"pirate@{old_fp}" not in loaded


def test_stats_count_requests_and_tokens_saved(server):
    c = server["client"]
    before = c.get("/genpi/stats").json()["models"].get("french.v1", {"requests": 0, "prompt_tokens_saved": 0})
    saved = c.post("/v1/chat/completions", json=_chat("french.v1", "hi")).json()["genpi"]["prompt_tokens_saved"]
    c.post("/v1/chat/completions", json=_chat("french.v1", "hi", stream=True))
    after = c.get("/genpi/stats").json()["models"]["french.v1"]
    assert after["requests"] == before["requests"] + 2 and after["errors"] == 0
    assert after["prompt_tokens_saved"] == before["prompt_tokens_saved"] + 2 * saved
    assert after["latency_ms_p50"] > 0
    assert c.get("/genpi/stats").json()["models"]["(rejected)"]["errors"] >= 1


def test_load_200_requests_16_clients(server):
    """200 requests, 16 concurrent clients, mixed adapters and the base, on loopback."""
    models = [*PROMPTS, server["base"]]
    latencies: list[float] = []
    errors: list[str] = []

    async def client(worker: int, jobs: asyncio.Queue):
        async with httpx.AsyncClient(base_url=server["url"], timeout=120) as c:
            while not jobs.empty():
                i = jobs.get_nowait()
                t0 = time.perf_counter()
                r = await c.post("/v1/chat/completions",
                                 json=_chat(models[i % len(models)], QUESTIONS[i % len(QUESTIONS)], max_tokens=8))
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or not r.json()["choices"][0]["message"]["content"]:
                    errors.append(f"{r.status_code}: {r.text[:200]}")

    async def run():
        jobs: asyncio.Queue = asyncio.Queue()
        for i in range(200):
            jobs.put_nowait(i)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(w, jobs) for w in range(16)))
        return time.perf_counter() - t0

    wall = asyncio.run(run())
    q = statistics.quantiles(latencies, n=100)
    print(f"\nload: 200 requests, 16 clients: {len(errors)} errors, p50 {q[49] * 1000:.0f} ms, "
          f"p95 {q[94] * 1000:.0f} ms, {200 / wall:.1f} requests/s")
    assert errors == [] and len(latencies) == 200
