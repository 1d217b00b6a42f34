"""The in-process runner (`genpi internalize`): one base model in this process, loaded on
first use, shared by synthesis (one engine), packed training and evaluation. No Ray."""
from __future__ import annotations

import logging
import time
import traceback
from typing import Iterator

from genpi.config import GenpiConfig
from genpi.pipeline.records import PromptPlan
from genpi.store import Store

log = logging.getLogger(__name__)


class LocalRunner:
    def __init__(self, cfg: GenpiConfig, facts):
        self.cfg, self.facts = cfg, facts
        self.tok = facts.tok
        self._model = self._engine = None

    @property
    def model(self):
        if self._model is None:
            from genpi.models import load_model

            self._model, _, _ = load_model(self.cfg.model)
        return self._model

    def synth_runner(self):
        from genpi.engines.hf import HFEngine
        from genpi.synth.pipeline import LocalRunner as EngineRunner

        if self._engine is None:
            self._engine = HFEngine.for_model(self.model, self.tok, self.cfg)
        # The Ray runner's grouping of prompts (cluster.synth_actors), so that both runners
        # batch the same rows together and write the same synthesis.
        return EngineRunner(self._engine, workers=self.cfg.cluster.synth_actors)

    def close(self) -> None:
        """Nothing to release: the model lives in this process and goes with it."""

    def train(self, cfg: GenpiConfig, store: Store, jobs, run_name: str):
        from genpi.train.jobs import train_local

        return train_local(cfg, store, jobs, self.model, self.tok, base_model_name=self.facts.path)

    def evaluate(self, plans: list[PromptPlan], store: Store, force: bool = False
                 ) -> Iterator[tuple[str, object, str | None, float]]:
        """(prompt id, EvalResult or None, error or None, seconds) per prompt, as each finishes."""
        from genpi.pipeline.stages import evaluate_stored

        for p in plans:
            t0 = time.time()
            try:
                ev = evaluate_stored(self.model, self.tok, store, p, force=force)
                yield p.id, ev, None, time.time() - t0
            except Exception as e:  # this prompt fails; the others are evaluated
                log.error("%s: eval failed\n%s", p.id, traceback.format_exc())
                yield p.id, None, f"{type(e).__name__}: {e}", time.time() - t0
