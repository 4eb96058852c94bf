"""Where every pipeline output lives, relative to the project root (dvc.yaml names the same),
and the one folder of inputs that are the user's own, custom/ (palm_tasks/custom.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CUSTOM = "custom"  # your own reward functions and prompts, relative to the project root; dvc.yaml names it
WORK = ".palm"  # palm's own working files (a run's params with its overrides, rsft round checkpoints): no output, gitignored


def check_custom_path(path: str) -> str:
    """`path` if it is a relative path inside custom/ (ValueError otherwise); existence is
    checked against the project in palm_tasks.custom.check_custom."""
    if not path or not path.isprintable() or "\\" in path:
        raise ValueError("write a relative path under custom/ (printable, with /), e.g. custom/prompts.jsonl")
    parts = PurePosixPath(path).parts
    if PurePosixPath(path).is_absolute() or ".." in parts or len(parts) < 2 or parts[0] != CUSTOM:
        raise ValueError(f"must lie in the project's {CUSTOM}/ folder (e.g. custom/prompts.jsonl): "
                         "dvc.yaml tracks that folder, so a changed file reruns what it affects")
    return path



@dataclass(frozen=True)
class Paths:
    root: Path

    # --- rewards stage
    @property
    def base(self) -> Path:  # the converted base model, or base.json pointing at a local one
        return self.root / "models" / "base"

    @property
    def reward_models(self) -> Path:  # reward models the pipeline trains (humor)
        return self.root / "models" / "rewards"

    @property
    def prompts(self) -> Path:  # train.jsonl, eval.jsonl
        return self.root / "data" / "prompts"

    # --- grid stage
    @property
    def grid(self) -> Path:
        return self.root / "data" / "grid.json"

    @property
    def samples(self) -> Path:  # the sample pool of the base: eval.json, train.json (schema.SamplePool)
        return self.root / "data" / "samples"

    # --- align and soups stages: the job stores and the pools
    @property
    def round_checkpoints(self) -> Path:  # <key>/round-<r>/: the last finished rsft round of an unfinished job
        return self.root / WORK / "rounds"

    @property
    def members(self) -> Path:  # one directory per finished alignment job
        return self.root / "models" / "members"

    @property
    def soups(self) -> Path:  # one directory per evaluated Rewarded-Soups candidate
        return self.root / "models" / "soups"

    @property
    def pool(self) -> Path:  # schema.Pool of the trained policies
        return self.root / "data" / "pool.json"

    @property
    def soup_pool(self) -> Path:  # schema.Pool of the soups
        return self.root / "data" / "soups.json"

    # --- coverage stage
    @property
    def portfolio(self) -> Path:  # portfolio.Portfolio
        return self.root / "portfolio.json"

    # --- evaluate stage: its own job stores, so it never changes another stage's output
    @property
    def evaluation_members(self) -> Path:
        return self.root / "models" / "evaluation" / "members"

    @property
    def evaluation_soups(self) -> Path:
        return self.root / "models" / "evaluation" / "soups"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    # --- every stage
    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def member(self, key: str) -> Path:
        return self.members / key

    def relative(self, path: Path) -> str:
        """`path` relative to the project root, as artifacts store it."""
        return str(Path(path).resolve().relative_to(self.root.resolve()))
