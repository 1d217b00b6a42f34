"""A kustomize renderer for the subset the generated manifests use (resources, patches:
JSON 6902 with a target or strategic merge on maps, images), so that tests/test_k8s.py can
check k8s/ where neither kustomize nor kubectl is installed. Where kubectl is installed, the
tests compare this renderer's output with `kubectl kustomize` (`kubectl_kustomize` below).

A test helper, not part of genpi: deploying uses `kubectl apply -k`.
"""
from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml


class KustomizeError(ValueError):
    pass


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer must start with '/': {path}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add / replace / remove / test (what the overlays use)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            idx = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[idx] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[idx]
            elif kind == "test":
                if node[idx] != op["value"]:
                    raise KustomizeError(f"test failed at {op['path']}")
            else:
                raise KustomizeError(f"unsupported JSON patch op '{kind}'")
            continue
        if kind in ("replace", "remove", "test") and last not in node:
            raise KustomizeError(f"{kind}: no value at {op['path']}")
        if kind in ("add", "replace"):
            node[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[last]
        elif kind == "test":
            if node[last] != op["value"]:
                raise KustomizeError(f"test failed at {op['path']}")
        else:
            raise KustomizeError(f"unsupported JSON patch op '{kind}'")
    return doc


def strategic_merge(doc: Any, patch: Any) -> Any:
    """Maps merge key by key (null deletes); lists of maps with a `name` merge by name, as
    kustomize does for types without a schema; other lists are replaced."""
    if isinstance(doc, dict) and isinstance(patch, dict):
        out = dict(doc)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = strategic_merge(doc[k], v) if k in doc else copy.deepcopy(v)
        return out
    if (isinstance(doc, list) and isinstance(patch, list) and patch
            and all(isinstance(x, dict) and "name" in x for x in doc + patch)):
        out_l = [copy.deepcopy(x) for x in doc]
        for item in patch:
            for i, cur in enumerate(out_l):
                if cur["name"] == item["name"]:
                    out_l[i] = strategic_merge(cur, item)
                    break
            else:
                out_l.append(copy.deepcopy(item))
        return out_l
    return copy.deepcopy(patch)


def _matches(doc: dict[str, Any], target: dict[str, Any]) -> bool:
    api = doc.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    checks = {"kind": doc.get("kind"), "name": doc.get("metadata", {}).get("name"), "group": group, "version": version}
    return all(checks[k] == v for k, v in target.items() if k in checks)


def _set_images(node: Any, images: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    image = c.get("image", "")
                    name = image.split("@")[0].rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image.split("@")[0]
                    for im in images:
                        if im["name"] == name:
                            c["image"] = f"{im.get('newName', name)}:{im['newTag']}" if "newTag" in im \
                                else image.replace(name, im.get("newName", name), 1)
            _set_images(value, images)
    elif isinstance(node, list):
        for x in node:
            _set_images(x, images)


SUPPORTED = {"apiVersion", "kind", "resources", "patches", "images"}


def kustomize_build(folder: str | Path) -> list[dict[str, Any]]:
    """Render a kustomization folder (the subset above); unknown fields are errors, not ignored."""
    folder = Path(folder)
    kfile = folder / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"{folder}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text(encoding="utf-8")) or {}
    unknown = set(k) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{kfile}: fields this renderer does not implement: {', '.join(sorted(unknown))}")
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = (folder / res).resolve()
        docs.extend(kustomize_build(path) if path.is_dir() else _load_docs(path))
    seen = set()
    for d in docs:
        key = (d.get("kind"), d.get("metadata", {}).get("name"))
        if key in seen:
            raise KustomizeError(f"{folder}: {key[0]} {key[1]} is defined twice")
        seen.add(key)
    for p in k.get("patches", []):
        body = yaml.safe_load(p["patch"]) if "patch" in p else yaml.safe_load((folder / p["path"]).read_text(encoding="utf-8"))
        if isinstance(body, list):  # JSON 6902: needs a target
            if "target" not in p:
                raise KustomizeError(f"{kfile}: a JSON 6902 patch needs a target")
            hits = [i for i, d in enumerate(docs) if _matches(d, p["target"])]
        else:
            target = p.get("target") or {"kind": body.get("kind"), "name": body.get("metadata", {}).get("name")}
            hits = [i for i, d in enumerate(docs) if _matches(d, target)]
        if not hits:
            raise KustomizeError(f"{kfile}: patch {p.get('path', '(inline)')} matches no resource")
        for i in hits:
            docs[i] = json6902(docs[i], body) if isinstance(body, list) else strategic_merge(docs[i], body)
    if k.get("images"):
        for d in docs:
            _set_images(d, k["images"])
    return docs



def kubectl_kustomize(folder: str | Path) -> list[dict[str, Any]] | None:
    """`kubectl kustomize folder` parsed, or None where kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise KustomizeError(f"kubectl kustomize {folder}: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]
