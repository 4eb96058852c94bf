"""One validated configuration, loaded from params.yaml.

Every knob of the pipeline lives in params.yaml and nowhere else. `load_config` validates the
whole file before any work starts; a bad value raises `ConfigError` whose message names the
key, the value given and what is allowed, so the CLI can print one line and exit non-zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from palm_tasks.rewards import TRAITS as KNOWN_TRAITS

TASK_TRAITS = {"assistant": ["safety", "humor", "brevity"]}


class ConfigError(ValueError):
    """A params.yaml problem, worded for the person who wrote the file."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CoverageConfig(Section):
    eps: float = Field(0.05, gt=0, lt=1, description="multiplicative tolerance")
    delta: float = Field(0.02, ge=0, description="additive tolerance")
    z: float = Field(0.0, ge=0, description="standard errors of pessimism in the certificate")
    z_conservative: float = Field(1.0, ge=0, description="z of the conservative certificate reported beside it")
    test_lattice: int = Field(20, ge=1, description="simplex lattice divisions for test weights")
    test_users: int = Field(1000, ge=1, description="Dirichlet(1) users for the population metrics")


class SearchConfig(Section):
    mode: Literal["lazy", "coarse", "grid", "uniform", "random"] = "lazy"
    max_trainings: int = Field(6, ge=1, description="training budget of the align stage")
    coarse_divisions: int = Field(2, ge=1, description="coarse mode: lattice of step 1/divisions")
    k: int = Field(6, ge=1, description="uniform/random modes: number of weight vectors")


class DataConfig(Section):
    n_train: int = Field(64, ge=1)
    n_eval: int = Field(32, ge=1)


class TrainingConfig(Section):
    steps: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    max_completion_length: int = Field(24, ge=1)
    num_generations: int = Field(4, ge=2, description="completions per prompt (GRPO group)")
    batch_size: int = Field(4, ge=1, description="completions per step; multiple of num_generations")
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.0, ge=0, description="KL coefficient; 0 loads no reference model")

    @model_validator(mode="after")
    def _batch_divisible(self):
        if self.batch_size % self.num_generations:
            raise ValueError(
                f"training.batch_size = {self.batch_size} must be a multiple of "
                f"training.num_generations = {self.num_generations}"
            )
        return self


class EvaluationConfig(Section):
    n_prompts: int = Field(32, ge=1, description="eval prompts used for value vectors")
    samples_per_prompt: int = Field(1, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    temperature: float = Field(0.7, gt=0)
    batch_size: int = Field(16, ge=1)


class RewardsConfig(Section):
    brevity_max_words: int = Field(30, ge=1)
    base_samples: int = Field(32, ge=2, description="base-model samples scored by the rewards stage")


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "palm"
    registered_model_prefix: str = "palm"


class PalmConfig(Section):
    task: Literal["assistant"] = "assistant"
    traits: list[str] = Field(default_factory=lambda: list(TASK_TRAITS["assistant"]))
    base_model: str = Field("smollm2", description="'smollm2' or a local model directory")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    coverage: CoverageConfig = CoverageConfig()
    search: SearchConfig = SearchConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    rewards: RewardsConfig = RewardsConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @field_validator("traits")
    @classmethod
    def _traits_known(cls, traits):
        unknown = [t for t in traits if t not in KNOWN_TRAITS]
        if unknown:
            raise ValueError(f"unknown trait(s) {unknown}; allowed: {list(KNOWN_TRAITS)}")
        if len(set(traits)) != len(traits):
            raise ValueError("traits must be distinct")
        if len(traits) < 2:
            raise ValueError("at least 2 traits are needed for a trade-off")
        return traits

    @model_validator(mode="after")
    def _eval_fits(self):
        if self.evaluation.n_prompts > self.data.n_eval:
            raise ValueError(
                f"evaluation.n_prompts = {self.evaluation.n_prompts} exceeds "
                f"data.n_eval = {self.data.n_eval}"
            )
        return self

    @property
    def d(self) -> int:
        return len(self.traits)


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "params.yaml"
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (a typo?); remove it or use one of the documented keys"
    if error["type"] == "missing":
        return f"{key}: required"
    return f"{key} = {error.get('input')!r}: {msg}"


def parse_config(data: dict | None, source: str = "params.yaml") -> PalmConfig:
    """Validate a params mapping; ConfigError lists every problem, one per line."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        return PalmConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def load_config(path: str | Path = "params.yaml") -> PalmConfig:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (run palm from the project directory)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path))
