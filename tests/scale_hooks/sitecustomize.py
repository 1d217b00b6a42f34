"""Test-only failure injection for tests/test_scale.py: put this folder on PYTHONPATH of the
batch job and every process of its local Ray (they inherit the driver's environment) imports
it at start-up. It does nothing unless GENPI_SCALE_FAIL is set, a JSON object naming one
prompt id per stage:

    {"synth": "<id>", "train": "<id>", "eval": "<id>"}

- synth: the generation pass raises on any batch holding that prompt's rows (inside the
  engine actor; genpi.synth.stages.run_isolated then retries each prompt of the batch alone);
- train: reading that prompt's synthesized data for training raises (genpi.train.jobs.prepare_jobs
  on the driver: the place where genpi isolates one prompt's training failure; a pack that
  raises mid-training fails its whole pack, see the report of issue 15);
- eval: evaluating that prompt's stored adapter raises (inside the evaluation actor).

Patches are applied when genpi imports the module they touch (a post-import hook), so
processes that never import genpi (Ray's own helpers) pay nothing and import no torch.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys

FAIL = json.loads(os.environ.get("GENPI_SCALE_FAIL") or "{}")


class InjectedFailure(RuntimeError):
    """Raised where the test asks for a failure (the message names the stage and prompt)."""


def _patch_synth_stages(mod) -> None:
    target = FAIL["synth"]
    inner = mod.STAGES["generate"]

    def generate(engine, rows):
        if any(r.get("prompt_id") == target for r in rows):
            raise InjectedFailure(f"injected synthesis failure for {target}")
        return inner(engine, rows)

    mod.STAGES["generate"] = generate


def _patch_synth_pipeline(mod) -> None:
    # prepare_jobs calls load_synth(store, job.synth_dir) for each prompt it trains; the
    # folder is <store>/prompts/<id>/<fingerprint>.
    target = FAIL["train"]
    inner = mod.load_synth

    def load_synth(store, pdir):
        if f"/prompts/{target}/" in f"{pdir}/":
            raise InjectedFailure(f"injected training-data failure for {target}")
        return inner(store, pdir)

    mod.load_synth = load_synth


def _patch_pipeline_stages(mod) -> None:
    target = FAIL["eval"]
    inner = mod.evaluate_stored

    def evaluate_stored(model, tok, store, p, force=False):
        if p.id == target:
            raise InjectedFailure(f"injected evaluation failure for {target}")
        return inner(model, tok, store, p, force=force)

    mod.evaluate_stored = evaluate_stored


PATCHES = {"genpi.synth.stages": ("synth", _patch_synth_stages),
           "genpi.synth.pipeline": ("train", _patch_synth_pipeline),
           "genpi.pipeline.stages": ("eval", _patch_pipeline_stages)}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, patch):
        self.inner, self.patch = inner, patch

    def __getattr__(self, name):  # get_source, get_data, is_package...: the real loader's
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the patched modules with the other finders, then patches them once executed."""

    def find_spec(self, name, path=None, target=None):
        stage_patch = PATCHES.get(name)
        if stage_patch is None or stage_patch[0] not in FAIL:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, stage_patch[1])
                return spec
        return None


if FAIL:
    sys.meta_path.insert(0, _Finder())
