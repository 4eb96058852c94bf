"""The pipeline's stages, in order: one module each, and the registry everything else derives from.

    rewards -> grid -> align -> soups -> coverage -> register          (`palm run`, `dvc repro`)
    evaluate                                  (`palm evaluate`: a study of the pipeline, not in dvc.yaml)

Each stage module has `run(cfg, root, run_jobs=None) -> metrics` and declares what it reads and
writes: PARAMS (params.yaml keys or sections), DEPS (files other stages write), OUTS, METRICS and
PLOTS, and RUNS_JOBS (whether it takes the orchestrator's job runner; without one it runs jobs
in this process). The Prefect stage flows (flows/stages.py) and the CLI's stage names are
derived from `STAGES`, and the stages of dvc.yaml from `PIPELINE` (tests/test_stages.py checks
them). A stage module is imported only when its stage is used, so importing one stage never
imports the others.
"""

from __future__ import annotations

import importlib
import reprlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from palm_tasks.config import ConfigError, PalmConfig

_SHORT = reprlib.Repr()  # a path from params.yaml, quoted in a one-line error
_SHORT.maxstring = 120


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


def check_project_paths(cfg: PalmConfig, root: str | Path) -> None:
    """ConfigError unless the paths in params.yaml fit the project at `root`: the MLflow store
    lies inside it (and, if it exists, is an SQLite database), the base model is none of
    the pipeline's outputs, which stages delete and rewrite, and your own reward functions
    import and prompts file can be read (palm_tasks/custom.py). Every `palm` command runs this
    before any work (llm.base_model.prepare_base_model refuses models/base itself again)."""
    from palm_tasks.custom import check_prompts_file
    from palm_tasks.llm.reward_functions import check_functions
    from palm_tasks.tracking import tracking_uri

    tracking_uri(cfg, Path(root), create=False)
    check_base_model_source(cfg.base_model, root)
    check_prompts_file(cfg, Path(root))
    check_functions(cfg, Path(root))


def check_base_model_source(base_model: str, root: str | Path) -> None:
    """ConfigError if base_model lies in (or is) an output of a stage: the rewards stage empties
    models/base before it records the base model there, so `base_model: models/base` would delete
    the model it is about to read (and dvc repro removes every output before rerunning a stage)."""
    if base_model == "smollm2":
        return
    root = Path(root).resolve()
    model = Path(base_model).expanduser().resolve()  # relative: to where palm runs, as the stage reads it
    for stage in STAGES.values():
        for out in stage.outs:
            target = (root / out).resolve()
            if model == target or target in model.parents:
                raise ConfigError(
                    f"base_model = {_SHORT.repr(base_model)}: resolves to {model}, inside {out}, an output "
                    f"of the {stage.name} stage that the pipeline deletes and rewrites; keep the base "
                    "model outside the pipeline's outputs (e.g. in a directory of its own)")
