"""The pipeline's stages, in order: one module each, and the registry everything else derives from.

    rewards -> grid -> align -> soups -> coverage -> register          (`palm run`, `dvc repro`)
    evaluate                                                            (`palm evaluate`)

Each stage module has `run(cfg, root, run_jobs=None) -> metrics` and declares what it reads and
writes: PARAMS (params.yaml keys or sections), DEPS (files other stages write), OUTS, METRICS and
PLOTS, and RUNS_JOBS (whether it takes the orchestrator's job runner; without one it runs jobs
in this process). The Prefect stage flows (flows/stages.py), the CLI's stage names and the test
of dvc.yaml (tests/test_stages.py) are all derived from `STAGES`. A stage module is imported
only when its stage is used, so importing one stage never imports the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Stage:
    name: str

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"palm_tasks.stages.{self.name}")

    @property
    def run(self):
        return self.module.run

    @property
    def runs_jobs(self) -> bool:
        return self.module.RUNS_JOBS

    @property
    def params(self) -> tuple[str, ...]:
        return self.module.PARAMS

    @property
    def deps(self) -> tuple[str, ...]:
        return self.module.DEPS

    @property
    def outs(self) -> tuple[str, ...]:
        return self.module.OUTS + self.module.METRICS + self.module.PLOTS


PIPELINE: tuple[Stage, ...] = tuple(Stage(n) for n in ("rewards", "grid", "align", "soups", "coverage", "register"))
EVALUATE = Stage("evaluate")
STAGES: dict[str, Stage] = {s.name: s for s in (*PIPELINE, EVALUATE)}
