"""Where every pipeline output lives, relative to the project root (dvc.yaml names the same)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def prompts(self) -> Path:  # train.jsonl, eval.jsonl
        return self.root / "data" / "prompts"

    @property
    def base(self) -> Path:  # the converted base model, or base.json pointing at a local one
        return self.root / "models" / "base"

    @property
    def reward_models(self) -> Path:  # reward models the pipeline trains (humor)
        return self.root / "models" / "rewards"

    @property
    def members(self) -> Path:  # one directory per finished alignment job
        return self.root / "models" / "members"

    @property
    def soups(self) -> Path:  # one directory per evaluated Rewarded-Soups candidate
        return self.root / "models" / "soups"

    @property
    def grid(self) -> Path:
        return self.root / "data" / "grid.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def portfolio(self) -> Path:
        return self.root / "portfolio.json"

    def member(self, key: str) -> Path:
        return self.members / key
