"""What the pipeline does to one prompt's folder in the store, whichever runner ran the work.

One writer each for spec.json, the evaluation of a stored adapter, publish (DONE + the
registry summary) and the skip of an unchanged prompt, so both entry points write the
same files. Ray-free; the runners call `evaluate_stored` where their model lives.
"""
from __future__ import annotations

import logging
import tempfile
import uuid

from genpi.pipeline.records import PromptOutcome, PromptPlan
from genpi.store import Store

log = logging.getLogger(__name__)

# Every stage output of a fingerprint folder; DONE first, so nothing half-redone is served.
OUTPUTS = ("DONE", "eval.json", "adapter", "train.json", "synth", "error.json")


def write_spec(store: Store, p: PromptPlan, model_identity: str) -> None:
    """spec.json: the prompt, its resolved config and the base model it is trained on
    (serving checks the latter against the model it serves)."""
    path = f"{store.prompt_dir(p.id, p.fingerprint)}/spec.json"
    if not store.exists(path):
        store.write_json(path, {"entry": p.entry.model_dump(mode="json"), "config": p.cfg.model_dump(mode="json"),
                                "model": model_identity, "fingerprint": p.fingerprint})


def clear(store: Store, p: PromptPlan) -> None:
    """Forget every stage's output of this fingerprint (`--force`)."""
    pdir = store.prompt_dir(p.id, p.fingerprint)
    for name in OUTPUTS:
        store.remove(f"{pdir}/{name}")


def read_eval(store: Store, p: PromptPlan):
    from genpi.eval.result import EvalResult

    return EvalResult.read(store, store.prompt_dir(p.id, p.fingerprint))


def publish(store: Store, p: PromptPlan, ev, out: PromptOutcome | None = None) -> None:
    """DONE, then the registry points the prompt at this fingerprint with its summary."""
    from genpi.eval.result import registry_summary

    store.publish(p.id, p.fingerprint, registry_summary(ev))
    if out is not None:
        out.status, out.eval = "published", ev


def skip(store: Store, p: PromptPlan, out: PromptOutcome) -> None:
    """An unchanged prompt: nothing to do, except repairing a registry entry that a run killed
    between DONE and the registry update left pointing elsewhere."""
    out.status = "skipped"
    out.eval = read_eval(store, p)
    if store.published(p.id) != p.fingerprint:
        log.info("%s: registry pointed elsewhere; repaired", p.id)
        publish(store, p, out.eval)


def evaluate_stored(model, tok, store: Store, p: PromptPlan, force: bool = False):
    """Evaluate the stored adapter of a prompt on its held-out inputs and write eval.json
    (an existing eval.json is reused unless `force`). `model` is the bare base, unchanged after."""
    from peft import PeftModel

    from genpi.eval.run import evaluate

    pdir = store.prompt_dir(p.id, p.fingerprint)
    if not force:
        existing = read_eval(store, p)
        if existing is not None:
            return existing
    inputs = store.read_parquet(f"{pdir}/synth/inputs.parquet")
    heldout = [r["input"] for r in inputs if r["split"] == "heldout"]
    with tempfile.TemporaryDirectory(prefix="genpi-eval-") as tmp:
        adir = store.get_dir(f"{pdir}/adapter", tmp)
        name = "a_" + uuid.uuid4().hex[:8]
        peft_model = PeftModel.from_pretrained(model, adir, adapter_name=name)
        try:
            result = evaluate(peft_model, tok, p.entry, heldout, name, p.cfg)
        finally:
            peft_model.unload()
    result.write(store, pdir)
    return result
