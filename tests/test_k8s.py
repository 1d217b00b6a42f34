"""KubeRay manifests (k8s/) and cluster files (cluster/): rendered, validated, not stale,
and generated the same by an installed (non-editable) genpi outside the checkout.

Every kustomization is rendered (tests/k8s_kustomize.py; compared with `kubectl kustomize`
where kubectl is installed) and every ray.io document is validated against the KubeRay CRD
schemas in ../shared/kuberay-crds (skipped, with the reason, where that folder is absent).
Then what the schemas do not check: serveConfigV2, runtimeEnvYAML, submissionMode, replica
bounds, resources, GPU placement, secrets.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

import genpi.k8s.builders as B
import genpi.k8s.output as output
import genpi.k8s.profiles as P
import k8s_kustomize as kz
from genpi.config import load_config
from genpi.k8s import main as k8s_main
from genpi.serve.config import serve_config

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO.parent / "shared" / "kuberay-crds"
KUSTOMIZATIONS = ["base", "overlays/dev-cpu", "overlays/gpu-prod"]
PROFILE_OF = {"base": "base", "overlays/dev-cpu": "dev-cpu", "overlays/gpu-prod": "gpu-prod"}
CLUSTER_SPEC = {"RayJob": ("rayClusterSpec",), "RayService": ("rayClusterConfig",), "RayCluster": ()}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


@functools.lru_cache(maxsize=None)
def rendered(kdir: str) -> tuple:
    return tuple(kz.kustomize_build(REPO / "k8s" / kdir))


def cluster_runtime_env() -> dict:
    return yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text(encoding="utf-8"))


def docs_of(kdir: str, kind: str) -> list[dict]:
    return [d for d in rendered(kdir) if d["kind"] == kind]


def cluster_specs(kdir: str) -> list[tuple[str, dict]]:
    out = []
    for kind, path in CLUSTER_SPEC.items():
        for d in docs_of(kdir, kind):
            spec = d["spec"]
            for part in path:
                spec = spec[part]
            out.append((f"{kind}/{d['metadata']['name']}", spec))
    return out


def pod_templates(kdir: str) -> list[tuple[str, dict]]:
    out = []
    for name, spec in cluster_specs(kdir):
        out.append((f"{name} head", spec["headGroupSpec"]["template"]))
        out += [(f"{name} {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    for d in docs_of(kdir, "RayJob"):
        out.append((f"RayJob/{d['metadata']['name']} submitter", d["spec"]["submitterPodTemplate"]))
    return out


# --- generation -------------------------------------------------------------------------------


def test_committed_manifests_are_up_to_date():
    stale = output.stale_files(REPO / "k8s")
    assert not stale, f"k8s/ is stale, run `genpi k8s`: {stale}"


def test_a_config_change_makes_the_manifests_stale_until_regenerated(tmp_path):
    shutil.copytree(REPO / "k8s", tmp_path / "k8s")
    assert output.stale_files(tmp_path / "k8s") == []
    cfg = tmp_path / "cpu-dev.yaml"
    cfg.write_text((P.CONFIGS / "cpu-dev.yaml").read_text().replace("max_replicas: 2", "max_replicas: 5"))
    want = output.generate({"cpu-dev": cfg})
    stale = output.stale_files(tmp_path / "k8s", want)
    assert {"base/rayservice.yaml", "base/configmaps.yaml", "overlays/dev-cpu/rayservice-patch.yaml"} <= set(stale)
    (tmp_path / "k8s" / "base" / "stray.yaml").write_text("kind: ConfigMap\n")
    assert "base/stray.yaml" in output.stale_files(tmp_path / "k8s", want)
    (tmp_path / "k8s" / "base" / "stray.yaml").unlink()
    output.write_tree(tmp_path / "k8s", want)
    assert output.stale_files(tmp_path / "k8s", want) == []
    svc = next(d for d in kz.kustomize_build(tmp_path / "k8s" / "base") if d["kind"] == "RayService")
    model = next(d for d in yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["deployments"]
                 if d["name"] == "GenpiAdapters")
    assert model["autoscaling_config"]["max_replicas"] == 5


def _fake_checkout(root: Path) -> Path:
    shutil.copytree(REPO / "k8s", root / "k8s")
    (root / "pyproject.toml").write_text('[project]\nname = "genpi"\n')
    (root / "sub").mkdir()
    return root


def test_check_command_reports_stale_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert k8s_main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out
    # In any checkout, from any folder inside it: the checkout's own k8s/.
    root = _fake_checkout(tmp_path / "checkout")
    monkeypatch.chdir(root / "sub")
    assert k8s_main(["--check"]) == 0
    (root / "k8s" / "overlays" / "gpu-prod" / "rayjob-patch.yaml").write_text("[]\n")
    assert k8s_main(["--check"]) == 1
    assert "overlays/gpu-prod/rayjob-patch.yaml" in capsys.readouterr().err
    assert k8s_main([]) == 0
    assert "overlays/gpu-prod/rayjob-patch.yaml" in capsys.readouterr().out
    assert k8s_main(["--check"]) == 0
    # Outside a checkout, writing or checking k8s/ has no target: a clear error, exit 2.
    monkeypatch.chdir(tmp_path)
    assert k8s_main(["--check"]) == 2 and k8s_main([]) == 2
    assert "--render DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --config and --prompts only change a rendered tree
        k8s_main(["--prompts", str(REPO / "examples" / "prompts")])


def test_render_writes_the_whole_tree_with_the_users_config_and_prompts(tmp_path, capsys):
    out = tmp_path / "out"
    assert k8s_main(["--render", str(out)]) == 0
    assert {f.relative_to(out).as_posix(): f.read_text() for f in out.rglob("*") if f.is_file()} == output.generate()
    cfg = tmp_path / "mine.yaml"
    cfg.write_text((P.CONFIGS / "gpu.yaml").read_text().replace("s3://genpi-prod/store", "s3://my-bucket/genpi"))
    assert k8s_main(["--render", str(out), "--config", f"gpu={cfg}",
                     "--prompts", str(REPO / "examples" / "prompts")]) == 0
    gpu = {(d["kind"], d["metadata"]["name"]): d for d in kz.kustomize_build(out / "overlays" / "gpu-prod")}
    assert gpu["ConfigMap", "genpi-config"]["data"]["genpi.yaml"] == cfg.read_text()
    assert "s3://my-bucket/genpi" in gpu["RayService", "genpi-serve"]["spec"]["serveConfigV2"]
    assert set(gpu["ConfigMap", "genpi-prompts"]["data"]) == {"french.yaml", "pirate.yaml", "shell_agent.yaml"}
    # Bad input names what is wrong and exits 2 (not a traceback).
    capsys.readouterr()
    assert k8s_main(["--render", str(out), "--config", f"nope={cfg}"]) == 2
    assert "nope" in capsys.readouterr().err
    assert k8s_main(["--render", str(out), "--prompts", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    cfg.write_text("cluster:\n  train_workers: zero\n")
    assert k8s_main(["--render", str(out), "--config", f"gpu={cfg}"]) == 2
    assert "train_workers" in capsys.readouterr().err


def test_render_works_from_an_installed_package_outside_the_checkout(tmp_path):
    """A non-editable install of genpi (built from a copy of the sources, so nothing is
    written into the checkout), run with its cwd and import path outside the checkout,
    renders exactly what the checkout generates."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "genpi", src / "genpi", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(src)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(src)  # the installed copy must not need its sources
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(site)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=120)

    where = run("-c", "import genpi.k8s, importlib.metadata as m; print(genpi.k8s.__file__); "
                      "print(m.distribution('genpi').locate_file('genpi'))")
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    rendered_ = run("-m", "genpi.k8s", "--render", "out")
    assert rendered_.returncode == 0, rendered_.stderr
    files = {f.relative_to(work / "out").as_posix(): f.read_text() for f in (work / "out").rglob("*") if f.is_file()}
    assert files == output.generate()
    # The `genpi` command of the installed package, as a user runs it.
    script = run(str(site / "bin" / "genpi"), "k8s", "--render", "out2")
    assert script.returncode == 0, script.stderr
    assert not output.stale_files(work / "out2")
    outside = run("-m", "genpi.k8s", "--check")
    assert outside.returncode == 2 and "--render DIR" in outside.stderr


def test_packaged_data_is_the_one_source_of_the_checkouts_copies():
    """cluster/configs/*.yaml (the paths users pass to --config) are links to the packaged
    configs; the packaged default prompt is the example of the same name."""
    for name in P.config_names():
        link = REPO / "cluster" / "configs" / f"{name}.yaml"
        assert link.is_symlink() and link.resolve() == (P.CONFIGS / f"{name}.yaml").resolve(), link
    assert sorted(f.name for f in (REPO / "cluster" / "configs").iterdir()) == [f"{n}.yaml" for n in P.config_names()]
    for f in P.DEFAULT_PROMPTS.iterdir():
        assert f.read_text() == (REPO / "examples" / "prompts" / f.name).read_text(), f.name
    assert P.profiles().job_env_vars == cluster_runtime_env()["env_vars"]


def test_versions_come_from_the_package_metadata():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert P.genpi_version() == project["version"]
    pins = [re.fullmatch(r"ray(\[.*\])?==(\S+)", d) for d in project["dependencies"]]
    assert P.ray_version() == next(m.group(2) for m in pins if m)
    for kdir in KUSTOMIZATIONS:
        for name, spec in cluster_specs(kdir):
            assert spec["rayVersion"] == P.ray_version(), name
        for name, tpl in pod_templates(kdir):
            assert tpl["spec"]["containers"][0]["image"].startswith(f"genpi:{project['version']}"), name


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_worker_pods_are_sized_from_the_configs_cluster_and_serve_sections(kdir):
    import math

    profile = P.profile(PROFILE_OF[kdir])
    cfg = load_config(P.config_path(PROFILE_OF[kdir]))
    c, s = cfg.cluster, cfg.serve
    actors = [(c.cpus_per_engine_actor, c.gpus_per_engine_actor), (c.cpus_per_train_worker, c.gpus_per_train_worker),
              (s.cpus_per_replica, s.gpus_per_replica)]
    cpus = max(a[0] for a in actors) * profile.worker.actors_per_pod + profile.worker.extra_cpus
    gpus = math.ceil(max(a[1] for a in actors) * profile.worker.actors_per_pod)
    for name, spec in cluster_specs(kdir):
        (group,) = spec["workerGroupSpecs"]
        r = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(r["cpu"]) == cpus, name
        assert r["memory"] == f"{int(cpus * profile.worker.memory_gib_per_cpu)}Gi", name
        assert int(r.get("nvidia.com/gpu", 0)) == gpus, name
        # Every actor of every stage fits in a pod, and the group holds the largest stage.
        for actor_cpus, actor_gpus in actors:
            assert actor_cpus <= float(r["cpu"]) and actor_gpus <= gpus, name
        pods_needed = max(c.synth_actors, c.train_workers, s.max_replicas) / profile.worker.actors_per_pod
        assert group["maxReplicas"] >= pods_needed, name


def test_a_change_of_actor_sizes_resizes_the_pods(tmp_path):
    cfg = tmp_path / "gpu.yaml"
    text = (P.CONFIGS / "gpu.yaml").read_text()
    cfg.write_text(text.replace("cpus_per_train_worker: 4", "cpus_per_train_worker: 6")
                   .replace("gpus_per_train_worker: 1", "gpus_per_train_worker: 2"))
    ops = yaml.safe_load(output.generate({"gpu": cfg})["overlays/gpu-prod/raycluster-patch.yaml"])
    res = next(o["value"] for o in ops if o["path"] == "/spec/workerGroupSpecs/0/template/spec/containers/0/resources")
    assert res["limits"] == {"cpu": "10", "memory": "60Gi", "nvidia.com/gpu": "2"}  # 6 + 4 extra CPUs, 6 GiB each
    cfg.write_text(text.replace("max_replicas: 4", "max_replicas: 9"))
    with pytest.raises(ValueError, match="gpu-prod.*9 actors"):
        output.generate({"gpu": cfg})


def _bytes(quantity: str) -> int:
    m = re.fullmatch(r"(\d+)(Gi|Mi)?", quantity)
    assert m, quantity
    return int(m.group(1)) * {"Gi": 1024 ** 3, "Mi": 1024 ** 2, None: 1}[m.group(2)]


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_object_store_and_dev_shm_are_sized_together_in_every_pod(kdir):
    """Issue 14 defect 10: /dev/shm was 2Gi while Ray's object store defaults to 30% of the
    pod's memory (and falls back to /tmp on disk when /dev/shm is smaller)."""
    fraction = P.profiles().object_store.fraction
    pods = 0
    for name, spec in cluster_specs(kdir):
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            memory = _bytes(pod["containers"][0]["resources"]["limits"]["memory"])
            store = int(group["rayStartParams"]["object-store-memory"])
            (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
            assert shm["emptyDir"]["medium"] == "Memory", name
            (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "dshm"]
            assert mount["mountPath"] == "/dev/shm", name
            shm_size = _bytes(shm["emptyDir"]["sizeLimit"])
            # The object store fits in /dev/shm, which fits in the pod's memory limit (tmpfs
            # pages count against it), and it is the share Ray would take by itself.
            assert store <= shm_size < memory, (name, store, shm_size, memory)
            assert abs(store - fraction * memory) <= 1024 ** 2, (name, store, memory)
            assert store >= 78643200, f"{name}: Ray refuses an object store under 75 MiB"
            pods += 1
    assert pods == 6, kdir  # head and workers of the RayJob, RayService and RayCluster


def test_a_bigger_pod_gets_a_bigger_object_store_and_dev_shm(tmp_path):
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text((P.CONFIGS / "gpu.yaml").read_text().replace("cpus_per_train_worker: 4", "cpus_per_train_worker: 12"))
    ops = yaml.safe_load(output.generate({"gpu": cfg})["overlays/gpu-prod/rayjob-patch.yaml"])
    value = {o["path"].removeprefix("/spec/rayClusterSpec/"): o["value"] for o in ops}
    assert value["workerGroupSpecs/0/template/spec/containers/0/resources"]["limits"]["memory"] == "96Gi"  # 16 x 6
    store = int(value["workerGroupSpecs/0/rayStartParams/object-store-memory"])
    assert store == int(96 * 1024 * P.profiles().object_store.fraction) * 1024 ** 2
    assert _bytes(value["workerGroupSpecs/0/template/spec/volumes/2/emptyDir/sizeLimit"]) >= store
    assert value["headGroupSpec/rayStartParams/object-store-memory"] == str(
        int(16 * 1024 * P.profiles().object_store.fraction) * 1024 ** 2)


@pytest.mark.parametrize("field", ["cpus_per_engine_actor", "cpus_per_train_worker"])
def test_a_config_without_cpus_per_actor_is_refused_for_pods(tmp_path, field):
    """None (every CPU of the largest node) is the local default; a pod cannot be sized from
    it, and sizing it as 1 CPU would silently make pods too small for the actors."""
    cfg = tmp_path / "gpu.yaml"
    lines = (P.CONFIGS / "gpu.yaml").read_text().splitlines(keepends=True)
    cfg.write_text("".join(line for line in lines if field not in line))
    assert getattr(load_config(cfg).cluster, field) is None
    with pytest.raises(ValueError, match=rf"profile gpu-prod \(config gpu\): cluster\.{field} not set"):
        output.generate({"gpu": cfg})
    assert k8s_main(["--render", str(tmp_path / "out"), "--config", f"gpu={cfg}"]) == 2


def test_gpu_serving_lets_vllm_batch():
    """Issue 14 defect 9: max_ongoing_requests caps the batch vLLM can form per replica."""
    gpu = yaml.safe_load(docs_of("overlays/gpu-prod", "RayService")[0]["spec"]["serveConfigV2"])
    dc = gpu["applications"][0]["args"]["llm_configs"][0]["deployment_config"]
    assert dc["max_ongoing_requests"] >= 256  # vLLM's default max_num_seqs
    # The autoscaler scales on the target: well below the cap, so backlog shows before it.
    assert dc["autoscaling_config"]["target_ongoing_requests"] <= dc["max_ongoing_requests"] / 2


# --- rendering --------------------------------------------------------------------------------


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_kustomizations_render_the_three_ray_resources(kdir):
    kinds = sorted(d["kind"] for d in rendered(kdir))
    assert kinds.count("RayJob") == kinds.count("RayService") == kinds.count("RayCluster") == 1
    assert "Secret" not in kinds


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_renderer_matches_kubectl_kustomize(kdir):
    docs = kz.kubectl_kustomize(REPO / "k8s" / kdir)
    if docs is None:
        pytest.skip("kubectl is not installed: the renderer is checked against kustomize only where it is")
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in rendered(kdir)}
    assert ours == theirs


def test_renderer_applies_json6902_strategic_merge_and_images(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "kustomization.yaml").write_text("resources: [r.yaml]\n")
    (tmp_path / "base" / "r.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"},
         "spec": {"workerGroupSpecs": [{"groupName": "w", "maxReplicas": 1,
                                        "template": {"spec": {"containers": [{"name": "x", "image": "genpi:1"}]}}}]}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m"}, "data": {"a": "1", "b": "2"}}]))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["../base"],
        "patches": [{"target": {"kind": "RayCluster", "name": "c"},
                     "patch": yaml.safe_dump([{"op": "replace", "path": "/spec/workerGroupSpecs/0/maxReplicas", "value": 4},
                                              {"op": "add", "path": "/spec/workerGroupSpecs/0/template/spec/tolerations",
                                               "value": [{"key": "g"}]}])},
                    {"patch": yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m"},
                                              "data": {"b": "3", "c": "4"}})}],
        "images": [{"name": "genpi", "newName": "reg/genpi", "newTag": "2"}]}))
    c, m = kz.kustomize_build(tmp_path / "o")
    g = c["spec"]["workerGroupSpecs"][0]
    assert g["maxReplicas"] == 4 and g["template"]["spec"]["tolerations"] == [{"key": "g"}]
    assert g["template"]["spec"]["containers"][0]["image"] == "reg/genpi:2"
    assert m["data"] == {"a": "1", "b": "3", "c": "4"}
    (tmp_path / "o" / "kustomization.yaml").write_text("resources: [../base]\nnamePrefix: x-\n")
    with pytest.raises(kz.KustomizeError, match="namePrefix"):
        kz.kustomize_build(tmp_path / "o")
    with pytest.raises(kz.KustomizeError, match="no value"):
        kz.json6902({"a": {}}, [{"op": "replace", "path": "/a/b", "value": 1}])


# --- CRD schemas --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS} (they live in the shared folder beside the repo)")
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_every_ray_document_validates_against_the_kuberay_crd(kdir):
    ray_docs = [d for d in rendered(kdir) if d["apiVersion"].startswith("ray.io/")]
    assert len(ray_docs) == 3
    for d in ray_docs:
        assert d["apiVersion"] == "ray.io/v1"
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(d["kind"]).iter_errors(d)]
        assert not errors, f"{kdir} {d['kind']}: {errors[:5]}"


def test_crd_validation_catches_a_bad_field():
    import copy

    job = copy.deepcopy(docs_of("overlays/gpu-prod", "RayJob")[0])
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    paths = {"/".join(map(str, e.absolute_path)) for e in crd_validator("RayJob").iter_errors(job)}
    assert "spec/rayClusterSpec/workerGroupSpecs/0/maxReplicas" in paths
    assert "spec/shutdownAfterJobFinishes" in paths


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_core_documents_are_well_formed(kdir):
    for d in rendered(kdir):
        if d["apiVersion"].startswith("ray.io/"):
            continue
        assert (d["apiVersion"], d["kind"]) == ("v1", "ConfigMap"), d["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"])
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in d["data"].items())


# --- what the schemas do not check ------------------------------------------------------------


def _import_path_exists(import_path: str) -> None:
    module, _, attr = import_path.partition(":")
    assert module and attr, import_path
    if module == "ray.serve.llm":
        # Importing it needs vLLM (the gpu extra): find the name in its source instead.
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, f"{module} is not installed"
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        names |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert attr in names, f"{import_path}: no '{attr}' in {spec.origin}"
    else:
        assert callable(getattr(importlib.import_module(module), attr)), import_path


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_serve_config_v2_is_a_valid_serve_config_made_from_the_profile_config(kdir):
    from ray.serve.schema import ServeDeploySchema

    svc = docs_of(kdir, "RayService")[0]
    parsed = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(parsed)
    for app in parsed["applications"]:
        _import_path_exists(app["import_path"])
    cfg_path = P.config_path(PROFILE_OF[kdir])
    # The same function `genpi serve` uses, on the same config: the two cannot drift.
    assert parsed == serve_config(load_config(cfg_path))
    from genpi.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["serve", "--print-config", "--config", str(cfg_path)]) == 0
    assert yaml.safe_load(buf.getvalue()) == parsed
    assert parsed["http_options"]["host"] == "0.0.0.0", "Serve must listen beyond the pod's loopback"
    # The config the RayJob runs with is the one serveConfigV2 was made from.
    cm = next(d for d in docs_of(kdir, "ConfigMap") if d["metadata"]["name"] == "genpi-config")
    assert cm["data"]["genpi.yaml"] == cfg_path.read_text(encoding="utf-8")


def test_gpu_overlay_serves_with_vllm_and_the_dev_one_with_the_hf_app():
    gpu = yaml.safe_load(docs_of("overlays/gpu-prod", "RayService")[0]["spec"]["serveConfigV2"])
    dev = yaml.safe_load(docs_of("overlays/dev-cpu", "RayService")[0]["spec"]["serveConfigV2"])
    assert gpu["applications"][0]["import_path"] == "ray.serve.llm:build_openai_app"
    llm = gpu["applications"][0]["args"]["llm_configs"][0]
    assert llm["lora_config"]["dynamic_lora_loading_path"].startswith("s3://")
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] > 1
    assert dev["applications"][0]["import_path"] == "genpi.serve.app:build_app"
    for dep in dev["applications"][0]["deployments"]:
        assert dep["autoscaling_config"]["min_replicas"] <= dep["autoscaling_config"]["max_replicas"]


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_rayjob_runs_the_batch_job_and_cleans_up(kdir):
    from ray.runtime_env import RuntimeEnv

    job = docs_of(kdir, "RayJob")[0]["spec"]
    assert job["submissionMode"] in SUBMISSION_MODES
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert isinstance(env, dict)
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    # The env vars `ray job submit --runtime-env cluster/runtime_env.yaml` uses too.
    assert env["env_vars"] == cluster_runtime_env()["env_vars"]
    # The entrypoint's files exist in the repository at the path the image puts it, and the
    # folders it reads are mounted in the head pod where the driver runs.
    words = job["entrypoint"].split()
    assert not set(job["entrypoint"]) & set(";&|$`<>"), "the submitter's shell would interpret these"
    script = next(w for w in words if w.startswith(B.APP_DIR))
    assert (REPO / os.path.relpath(script, B.APP_DIR)).is_file(), script
    args = dict(zip(words, words[1:]))
    mounts = {m["mountPath"] for m in job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert args["--manifest"] in mounts and os.path.dirname(args["--config"]) in mounts
    cfg = load_config(P.config_path(PROFILE_OF[kdir]))
    assert cfg.store.startswith("s3://") and cfg.cluster.resource_wait_s > 0
    assert ("internalize_and_export.sh" in script) == (cfg.serve.backend == "vllm")


def test_prompts_configmap_holds_valid_manifests(tmp_path):
    from genpi.manifest import load_manifest

    cm = next(d for d in docs_of("base", "ConfigMap") if d["metadata"]["name"] == "genpi-prompts")
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert {e.id for e in load_manifest(tmp_path)} >= {"french"}


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_autoscaling_worker_groups_have_replica_bounds(kdir):
    for name, spec in cluster_specs(kdir):
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["rayVersion"] == P.ray_version()
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{name}: no work on the head"
        assert spec["workerGroupSpecs"], name
        for g in spec["workerGroupSpecs"]:
            assert "minReplicas" in g and "maxReplicas" in g, f"{name} {g['groupName']}"
            assert g["minReplicas"] == 0 < g["maxReplicas"], f"{name}: workers scale from 0"
            assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS)
def test_every_container_has_requests_and_limits(kdir):
    for name, spec in cluster_specs(kdir):
        res = spec["autoscalerOptions"]["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), name
    templates = pod_templates(kdir)
    assert len(templates) == 7
    for name, tpl in templates:
        for c in tpl["spec"]["containers"]:
            r = c["resources"]
            assert {"cpu", "memory"} <= set(r["requests"]) and {"cpu", "memory"} <= set(r["limits"]), name
            assert r["requests"]["memory"] == r["limits"]["memory"] or "submitter" in name, name


def test_gpu_placement_only_in_the_gpu_overlay():
    for kdir in ("base", "overlays/dev-cpu"):
        for name, tpl in pod_templates(kdir):
            assert "tolerations" not in tpl["spec"] and "nodeSelector" not in tpl["spec"], name
            assert "nvidia.com/gpu" not in str(tpl), name
    gpu_groups = 0
    for name, spec in cluster_specs("overlays/gpu-prod"):
        assert "nvidia.com/gpu" not in str(spec["headGroupSpec"]), f"{name}: the head is CPU only"
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            r = pod["containers"][0]["resources"]
            assert r["requests"]["nvidia.com/gpu"] == r["limits"]["nvidia.com/gpu"] == "1"
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
            gpu_groups += 1
    assert gpu_groups == 3
    cfg = load_config(P.config_path("gpu-prod"))
    assert cfg.engine.kind == "vllm" and cfg.cluster.gpus_per_engine_actor >= 1 and cfg.cluster.resource_wait_s >= 600


CREDENTIAL = re.compile(r"(^|_)(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)", re.I)


def test_no_secret_value_in_any_manifest(monkeypatch):
    sentinel = "genpi-sentinel-Zq8xW3"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sentinel)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + "SENTINEL0000000")
    texts = {**output.generate(), **{str(p): p.read_text() for p in (REPO / "k8s").rglob("*.yaml")}}
    texts.update({str(p): p.read_text() for p in (REPO / "cluster").rglob("*.yaml")})
    for name, text in texts.items():
        assert sentinel not in text and "SENTINEL" not in text, name
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), name
    for kdir in KUSTOMIZATIONS:
        assert not [d for d in rendered(kdir) if d["kind"] == "Secret"]
        n_env = 0
        for name, tpl in pod_templates(kdir):
            for c in tpl["spec"]["containers"]:
                for e in c.get("env", []):
                    n_env += 1
                    if CREDENTIAL.search(e["name"]):
                        assert "value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == B.S3_SECRET, (name, e)
        assert n_env >= 4 * 6
        for d in docs_of(kdir, "RayJob"):
            env_vars = yaml.safe_load(d["spec"]["runtimeEnvYAML"]).get("env_vars", {})
            assert not [k for k in env_vars if CREDENTIAL.search(k)]
        for d in docs_of(kdir, "ConfigMap"):
            assert not [k for k in d["data"] if CREDENTIAL.search(k)]
            assert not any(re.search(r"^\s*aws_secret|secret_access_key\s*[:=]", v, re.I | re.M) for v in d["data"].values())


def test_every_pod_reads_the_credentials_from_the_secret():
    for kdir in KUSTOMIZATIONS:
        for name, tpl in pod_templates(kdir):
            if "submitter" in name:
                continue  # it only calls the dashboard; the driver and workers read the store
            env = {e["name"]: e for e in tpl["spec"]["containers"][0]["env"]}
            for key in B.SECRET_KEYS:
                assert env[key]["valueFrom"]["secretKeyRef"] == {"name": B.S3_SECRET, "key": key}, name
            assert env["AWS_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["optional"] is True
            # Workers get no credentials from the driver's runtime_env (issue 14 defect 6):
            # a session token, when the Secret has one, must reach every pod this way too.
            assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                "name": B.S3_SECRET, "key": "AWS_SESSION_TOKEN", "optional": True}, name
            # One malloc arena, as a local Ray gets (genpi.rayinit): Ray Train's worker thread.
            assert env["MALLOC_ARENA_MAX"] == {"name": "MALLOC_ARENA_MAX", "value": "1"}, name
    dev = {d["metadata"]["name"]: d for d in docs_of("overlays/dev-cpu", "ConfigMap")}
    assert dev[B.S3_ENDPOINT_CONFIGMAP]["data"]["AWS_ENDPOINT_URL"].startswith("http")


# --- cluster/ -----------------------------------------------------------------------------------


def test_runtime_env_file_is_valid_and_ships_the_repository():
    from ray.runtime_env import RuntimeEnv

    env = cluster_runtime_env()
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert {".git", ".cache"} <= set(env["excludes"])
    assert not [k for k in env["env_vars"] if CREDENTIAL.search(k)]


def test_dockerfile_uses_the_pinned_ray_and_the_gpu_extra():
    import ray

    text = (REPO / "cluster" / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", text, re.M)
    assert base and base.group(1).startswith(ray.__version__ + "-") and ray.__version__ == P.ray_version()
    assert "ray[llm]==" + ray.__version__ in (REPO / "pyproject.toml").read_text()
    assert re.search(r"^ARG EXTRAS=gpu,s3$", text, re.M) and '".[${EXTRAS}]"' in text
    assert f"WORKDIR {B.APP_DIR}" in text
    for folder in ("jobs", "cluster", "examples", "genpi"):
        assert re.search(rf"^COPY .*\b{folder} \./{folder}$", text, re.M), folder
    # The images the manifests name are the ones the Dockerfile's comments tell how to build.
    for kdir in KUSTOMIZATIONS:
        for name, tpl in pod_templates(kdir):
            image = tpl["spec"]["containers"][0]["image"]
            assert image.split(":")[0] == P.profiles().image and f"-t {image} " in text.replace("\\\n", " ") or \
                image == f"{P.profiles().image}:{P.genpi_version()}", (name, image)


def test_cluster_launcher_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # what `ray up` does before it touches a machine
    assert cfg["docker"]["image"] == f"{P.profiles().image}:{P.genpi_version()}"
    assert len(cfg["provider"]["worker_ips"]) == cfg["max_workers"]
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    assert "--gpus all" in cfg["docker"]["worker_run_options"]
    assert not re.search(r"--env \w+=", str(cfg["docker"]["run_options"])), "credentials are passed by name only"
    bad = dict(cfg, docker=dict(cfg["docker"], run_options="--gpus all"))
    with pytest.raises(Exception, match="run_options"):
        validate_config(prepare_config(bad))


def test_internalize_and_export_script(tmp_path):
    """The gpu entrypoint: runs the batch job with every argument, then `genpi serve
    --export-lora` with the config, store and overrides only; keeps the batch job's status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    for name in ("python", "genpi"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexit ${{STUB_{name.upper()}_RC:-0}}\n')
        (bin_dir / name).chmod(0o755)
    script = REPO / "cluster" / "internalize_and_export.sh"
    args = ["--manifest", "/p", "--config", "/c.yaml", "--store", "s3://b/s", "--dry-run", "train.epochs=1"]

    def run(**rc):
        log.unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **{f"STUB_{k}_RC": str(v) for k, v in rc.items()}}
        out = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30)
        return out.returncode, log.read_text().splitlines()

    rc, calls = run()
    assert rc == 0
    assert calls == [f"python {REPO}/jobs/internalize_many.py {' '.join(args)}",
                     "genpi serve --export-lora --config /c.yaml --store s3://b/s train.epochs=1"]
    assert run(PYTHON=1) == (1, calls[:1] + calls[1:])  # some prompts failed: still export the rest
    rc, calls = run(PYTHON=2)
    assert rc == 2 and len(calls) == 1  # bad input: nothing to export
    assert run(GENPI=1)[0] == 1
