"""One validated configuration, loaded from params.yaml.

Every knob of the pipeline lives in params.yaml and nowhere else. `load_config` validates the
whole file before any work starts; a bad value raises `ConfigError` whose message names the
key, the value given and what is allowed, so the CLI can print one line and exit non-zero.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from palm_tasks.rewards import TRAITS as KNOWN_TRAITS
from palm_tasks.rewards import check_reward_model_dir

# Each task's prompt set (palm_tasks/prompts.py) and the traits it is meant for; `traits`
# defaults to the task's when params.yaml leaves it out (or sets it to null).
TASK_TRAITS = {
    "assistant": ["safety", "humor", "brevity"],
    "gsm": ["correctness", "brevity"],
    "safety": ["relevance", "safety"],
}
COMPARE_METHODS = ("palm_lazy", "palm_grid", "uniform", "random", "centroid", "soups")


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
    split_seed: int | None = Field(None, ge=0, description="seed of the prompt split; null: seed. "
                                   "A retraining run with a new value draws a new data version")


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


class RewardModelConfig(Section):
    """A local Hugging Face sequence-classification reward model (rewards.HFRewardModel)."""

    path: str = Field(description="model directory (config.json, tokenizer, *.safetensors); "
                                  "relative paths are relative to where palm runs")
    label: int = Field(0, ge=0, description="which output logit is the reward")
    normalize: Literal["sigmoid", "softmax", "minmax"] = "sigmoid"
    lo: float | None = Field(None, description="minmax: logit mapped to 0")
    hi: float | None = Field(None, description="minmax: logit mapped to 1")
    batch_size: int = Field(16, ge=1, description="completions scored per forward pass")

    @model_validator(mode="after")
    def _usable(self):
        if self.normalize == "minmax" and (self.lo is None or self.hi is None or not self.hi > self.lo):
            raise ValueError(f"normalize = minmax needs lo < hi, got lo = {self.lo}, hi = {self.hi}")
        check_reward_model_dir(Path(self.path), self.label, self.normalize)
        return self


class RewardsConfig(Section):
    brevity_max_words: int = Field(30, ge=1)
    base_samples: int = Field(32, ge=2, description="base-model samples scored by the rewards stage")
    models: dict[str, RewardModelConfig] = Field(
        default_factory=dict, description="extra traits: name -> local HF reward model")

    @field_validator("models")
    @classmethod
    def _model_names(cls, models):
        for name in models:
            if name in KNOWN_TRAITS or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"reward model name {name!r} must be lowercase [a-z0-9_] and not a "
                                 f"built-in trait ({', '.join(KNOWN_TRAITS)})")
        return models


class SoupsConfig(Section):
    # Off by default: on the default run a soup beats a specialist at its own weight (within one
    # standard error), which raises the upper bound and leaves the portfolio uncertified; the
    # align stage's search does not see soups, so it cannot train where they open a gap.
    enabled: bool = Field(False, description="evaluate Rewarded-Soups candidates of the specialists")
    divisions: int = Field(2, ge=2, description="mixing weights on a simplex lattice of step 1/divisions")
    max_soups: int = Field(6, ge=0, description="at most this many soups (the most mixed first)")


class RunnerConfig(Section):
    """Where alignment jobs run: the Prefect task runner of the align flow (flows/runners.py)."""

    kind: Literal["threads", "dask", "ray"] = "threads"
    address: str | None = Field(None, description="dask/ray: a running cluster; null starts a local one")
    workers: int = Field(1, ge=1, description="jobs at once: threads, or workers of a local cluster")
    retries: int = Field(2, ge=0, description="Prefect retries of a job after a transient failure")
    retry_delay_seconds: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _address_needs_a_cluster(self):
        if self.address is not None and self.kind == "threads":
            raise ValueError(f"runner.address = {self.address!r} is for kind dask or ray, not threads")
        if self.kind == "ray" and importlib.util.find_spec("prefect_ray") is None:
            raise ValueError("kind ray needs the optional prefect-ray and ray: pip install -e '.[ray]'")
        return self


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "palm"
    registered_model_prefix: str = "palm"

    @field_validator("experiment", "registered_model_prefix")
    @classmethod
    def _plain_name(cls, name):
        # These go into MLflow search filters and registered model names: no quotes or paths.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise ValueError("use letters, digits, '_', '-' or '.' (at most 100, no quotes or '/')")
        return name


class CompareConfig(Section):
    """The evaluate stage: PALM against the baselines at equal portfolio sizes (theory.md 7)."""

    k_max: int = Field(7, ge=1, description="portfolio sizes k = 1..k_max")
    random_seeds: int = Field(3, ge=1, description="random-weights baseline: seeds (mean ± se)")
    grid_budget: int = Field(7, ge=1, description="trainings allowed to PALM on the grid (capped if the grid is larger)")
    methods: list[Literal[COMPARE_METHODS]] = Field(default_factory=lambda: list(COMPARE_METHODS))
    distinct_n: int = Field(2, ge=1, description="n of the distinct-n diversity metric")
    bootstrap: int = Field(200, ge=0, description="bootstrap resamples of users for the se of usage perplexity")


class PalmConfig(Section):
    task: Literal["assistant", "gsm", "safety"] = "assistant"
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
    soups: SoupsConfig = SoupsConfig()
    mlflow: MlflowConfig = MlflowConfig()
    runner: RunnerConfig = RunnerConfig()
    compare: CompareConfig = CompareConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_traits(cls, data):
        task = data.get("task", "assistant") if isinstance(data, dict) else None
        if isinstance(task, str) and data.get("traits") is None and task in TASK_TRAITS:
            data = {**data, "traits": list(TASK_TRAITS[task])}
        return data

    @field_validator("traits")
    @classmethod
    def _traits_known(cls, traits):
        if len(set(traits)) != len(traits):
            raise ValueError("traits must be distinct")
        if len(traits) < 2:
            raise ValueError("at least 2 traits are needed for a trade-off")
        return traits

    @model_validator(mode="after")
    def _traits_declared(self):
        allowed = list(KNOWN_TRAITS) + list(self.rewards.models)
        unknown = [t for t in self.traits if t not in allowed]
        if unknown:
            raise ValueError(f"traits = {self.traits}: unknown trait(s) {unknown}; allowed: {allowed} "
                             "(built-ins, and reward models declared under rewards.models)")
        return self

    @model_validator(mode="after")
    def _correctness_needs_gsm(self):
        if "correctness" in self.traits and self.task != "gsm":
            raise ValueError(f"trait correctness scores gsm_symbolic answers: it needs task: gsm, not {self.task!r}")
        return self

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
    if not key.isprintable():  # a key with a newline or control character: show it escaped
        key = repr(key)
    msg = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # whole-file checks name their keys themselves
        return msg
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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        # One line, as the CLI prints it: what is wrong and where.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_config(data, str(path))
