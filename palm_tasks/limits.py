"""What a valid params.yaml may ask the pipeline to build, checked before anything is allocated.

A value far beyond these fails later with a memory error or runs for days; `check_sizes(cfg)`
(called when the configuration is validated, palm_tasks/config.py) refuses it up front with
one line naming the key and the size it would need. The estimates read the base model's shape:
SmolLM2-135M's, or a local model directory's config.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

MAX_SEED = 2**32 - 1  # numpy's legacy seeding, sklearn and torch take seeds in [0, 2**32 - 1]

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


def check_sizes(cfg) -> None:
    """Refuse what would not fit before anything is allocated: one line naming the key and
    what it would need."""
    d, c = cfg.d, cfg.coverage
    if c.delta > 0:
        from palm_tasks.core.grid import grid_size_upper

        points = grid_size_upper(d, c.eps, c.delta)
        if points > MAX_GRID_POINTS:
            raise ValueError(
                f"coverage.eps = {c.eps}, coverage.delta = {c.delta}: the PALM grid for d = {d} has up "
                f"to {count(points)} points ({gib(points * GRID_BYTES_PER_COORDINATE * d)} "
                f"to build); at most {MAX_GRID_POINTS:,} are allowed: use a larger eps or delta")
    for key, k in (("search.k", cfg.search.k), ("compare.k_max", cfg.compare.k_max)):
        if k > MAX_WEIGHT_VECTORS:
            raise ValueError(f"{key} = {k}: {count(k)} weight vectors; at most {MAX_WEIGHT_VECTORS:,} "
                             "(choosing evenly spread weights takes time quadratic in their number)")
    for key, n in (("coverage.test_lattice", c.test_lattice), ("coverage.share_lattice", c.share_lattice),
                   ("compare.selection_lattice", cfg.compare.selection_lattice),
                   ("search.coarse_divisions", cfg.search.coarse_divisions)):
        points = math.comb(n + d - 1, d - 1)
        if points > MAX_LATTICE_POINTS:
            raise ValueError(f"{key} = {n}: a simplex lattice of step 1/{n} has {count(points)} points "
                             f"for d = {d}; at most {MAX_LATTICE_POINTS:,}")
    weights = math.comb(c.test_lattice + d - 1, d - 1) + c.test_users
    audit = 8 * weights * cfg.evaluation.n_prompts * (2 * cfg.evidence.best_of + d)
    if audit > MAX_AUDIT_BYTES:
        raise ValueError(
            f"coverage.test_users = {c.test_users}: {count(weights)} test weights (users and lattice) x "
            f"{cfg.evaluation.n_prompts} evaluation prompts x {cfg.evidence.best_of} answers need "
            f"{gib(audit)} for the evidence audit; at most {MAX_AUDIT_BYTES // 2**30} GiB: use fewer test users")
    _jobs_fit(cfg, weights)

def _jobs_fit(cfg, test_weights: int) -> None:
    """What one job, one measurement or one comparison would hold or loop over: refused
    naming the key and the size it would need (called by check_sizes)."""
    t, ev, cmp_, r, d = cfg.training, cfg.evaluation, cfg.compare, cfg.runner, cfg.d
    for key, n, limit, what in (
            ("data.n_train", cfg.data.n_train, MAX_PROMPTS, "prompts"),
            ("data.n_eval", cfg.data.n_eval, MAX_PROMPTS, "prompts"),
            ("evaluation.chunk_prompts", ev.chunk_prompts, MAX_PROMPTS, "prompts per chunk"),
            ("evaluation.min_prompts", ev.min_prompts, MAX_PROMPTS, "prompts"),
            ("evaluation.batch_size", ev.batch_size, MAX_BATCH, "answers per forward pass"),
            ("training.batch_size", t.batch, MAX_BATCH, "examples per step"),
            ("training.num_generations", t.num_generations, MAX_BATCH, "completions per prompt"),
            *((f"rewards.models.{name}.batch_size", m.batch_size, MAX_BATCH, "completions per forward pass")
              for name, m in cfg.rewards.models.items()),
            ("training.rounds", t.rounds, MAX_COUNT, "rounds"),
            ("training.epochs", t.epochs, MAX_COUNT, "epochs"),
            ("training.steps", t.steps, MAX_COUNT, "steps"),
            ("search.max_trainings", cfg.search.max_trainings, MAX_WEIGHT_VECTORS, "trainings"),
            ("search.max_repairs", cfg.search.max_repairs, MAX_WEIGHT_VECTORS, "repairs"),
            ("compare.random_seeds", cmp_.random_seeds, MAX_WEIGHT_VECTORS, "seeds, each a portfolio"),
            ("compare.grid_budget", cmp_.grid_budget, MAX_WEIGHT_VECTORS, "trainings"),
            ("compare.distinct_n", cmp_.distinct_n, 64, "words per n-gram"),
            ("soups.max_soups", cfg.soups.max_soups, MAX_WEIGHT_VECTORS, "soups"),
            ("evidence.chunk_prompts", cfg.evidence.chunk_prompts, MAX_PROMPTS, "prompts per chunk"),
            ("runner.workers", r.workers, MAX_WORKERS, "workers (a local cluster starts a process each)"),
            ("runner.retries", r.retries, 100, "retries")):
        if n > limit:
            raise ValueError(f"{key} = {count(n)}: {count(n)} {what}; at most {limit:,}")
    if r.retry_delay_seconds > MAX_RETRY_DELAY:
        raise ValueError(f"runner.retry_delay_seconds = {r.retry_delay_seconds:g}: a wait of "
                         f"{r.retry_delay_seconds / 86_400:.3g} days; at most {MAX_RETRY_DELAY:,.0f} s")
    points = math.comb(cfg.soups.divisions + d - 1, d - 1)
    if points > MAX_LATTICE_POINTS:
        raise ValueError(f"soups.divisions = {cfg.soups.divisions}: a simplex lattice of step "
                         f"1/{cfg.soups.divisions} has {count(points)} points for d = {d}; "
                         f"at most {MAX_LATTICE_POINTS:,}")
    for key, prompts, per_prompt, per_key in (
            ("training.samples_per_prompt", cfg.data.n_train, t.samples_per_prompt, "data.n_train"),
            ("evaluation.samples_per_prompt", ev.n_prompts, ev.samples_per_prompt, "evaluation.n_prompts")):
        if prompts * per_prompt > MAX_ANSWERS:
            raise ValueError(f"{key} = {count(per_prompt)}: {per_key} = {prompts:,} prompts x "
                             f"{count(per_prompt)} = {count(prompts * per_prompt)} answers to sample and "
                             f"score at once; at most {MAX_ANSWERS:,}")
    draws = cmp_.bootstrap * test_weights
    if draws > MAX_BOOTSTRAP_DRAWS:
        raise ValueError(f"compare.bootstrap = {count(cmp_.bootstrap)}: {count(cmp_.bootstrap)} resamples "
                         f"of {test_weights:,} test weights = {count(draws)} draws; at most "
                         f"{MAX_BOOTSTRAP_DRAWS:,}: use fewer resamples")
    # A job trains with seed + its repair attempt, and rsft's SFT rounds with that + the
    # round; the trainer seeds numpy's legacy generator, which takes 32-bit seeds only.
    offset = cfg.search.max_repairs + t.rounds
    if cfg.seed + offset > MAX_SEED:
        raise ValueError(f"seed = {cfg.seed}: training seeds go up to seed + search.max_repairs + "
                         f"training.rounds = {count(cfg.seed + offset)}; at most {MAX_SEED} (numpy's "
                         f"seeding in the trainer takes 32-bit seeds): use seed <= {MAX_SEED - offset}")
    shape = model_shape(cfg.base_model)
    context = shape["max_position_embeddings"]
    for key, tokens in (("evaluation.max_new_tokens", ev.max_new_tokens),
                        ("training.max_completion_length", t.max_completion_length)):
        if tokens > context:
            raise ValueError(f"{key} = {count(tokens)}: answers of {count(tokens)} tokens; the base model "
                             f"reads at most {context:,} (max_position_embeddings)")
    kv_per_token = 2 * shape["num_hidden_layers"] * shape["hidden_size"] * 4 \
        * shape["num_key_value_heads"] // max(shape["num_attention_heads"], 1)  # fp32 keys and values
    for key, batch, tokens in (("evaluation.batch_size", ev.batch_size, ev.max_new_tokens),
                               ("evaluation.batch_size", ev.batch_size, t.max_completion_length),
                               ("training.batch_size", t.batch, t.max_completion_length)):
        need = batch * ((PROMPT_TOKENS + tokens) * kv_per_token + shape["vocab_size"] * 4)
        if need > MAX_JOB_BYTES:
            raise ValueError(f"{key} = {batch:,} answers of up to {PROMPT_TOKENS} + {tokens:,} tokens: "
                             f"{gib(need)} of key/value cache and logits to generate them; at most "
                             f"{MAX_JOB_BYTES // 2**30} GiB")
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // max(shape["num_attention_heads"], 1)
    # target_modules all-linear: q, k, v, o, gate, up, down; a rank-r adapter on an (in, out)
    # matrix has r (in + out) parameters, each with a gradient and two Adam moments (fp32)
    per_rank = shape["num_hidden_layers"] * (7 * h + 2 * kv + 3 * i)
    if t.lora_rank > h:
        raise ValueError(f"training.lora_rank = {count(t.lora_rank)}: more than the base model's hidden "
                         f"size {h:,} (a LoRA update of rank above it is no smaller than the full "
                         f"matrix); {count(t.lora_rank * per_rank)} adapter parameters, "
                         f"{gib(16 * t.lora_rank * per_rank)} to train")
    if 16 * t.lora_rank * per_rank > MAX_JOB_BYTES:
        raise ValueError(f"training.lora_rank = {t.lora_rank:,}: {count(t.lora_rank * per_rank)} adapter "
                         f"parameters, {gib(16 * t.lora_rank * per_rank)} to train; at most "
                         f"{MAX_JOB_BYTES // 2**30} GiB")


def model_shape(base_model: str) -> dict[str, int]:
    """The base model's sizes the estimates of _jobs_fit use: SmolLM2-135M's, or a local
    model's config.json where it gives a positive integer (its other keys stay SmolLM2's)."""
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


def count(n) -> str:
    """A count for a message: 1,234,567 or, past 15 digits, about 10^k."""
    if n == math.inf:
        return "infinitely many"
    n = int(n)
    if n < 10**15:
        return f"{n:,}"
    # the exponent from the bit length: str(n) fails past 4,300 digits
    digits = int(n.bit_length() * math.log10(2))
    return f"about 10^{digits if 10**digits <= n else digits - 1}"


def gib(nbytes) -> str:
    """Memory for a message: about 1.5 GiB."""
    if nbytes == math.inf:
        return "unbounded memory"
    nbytes = int(nbytes)
    return f"about {nbytes / 2**30:.3g} GiB" if nbytes < 10**18 else f"{count(nbytes // 2**30)} GiB"


# Values in error messages are shown cut short: a value can be huge (a long list, a deep
# structure), and its full repr would cost more memory than the file it came from.
