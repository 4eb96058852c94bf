"""Jobs: training a policy, mixing a soup, re-evaluating a policy; their keys and their store.

A `Job` is what a flow asks a worker to do (JSON-able, so Prefect passes it to any runner). A
job's result is fully determined by its spec and stored under its key:

    train     JobSpec (base model, traits and reward versions, w, training and evaluation
              settings, prompt data, seed, the policy it starts from, the attempt)
              -> <store>/<key>/  (rsft or GRPO, palm_tasks.llm.train)
    soup      ingredient keys, lambdas, evaluation settings, seed -> <store>/<key>/
    evaluate  a stored policy under the current rewards and eval prompts
              -> <policy>/evaluations/<evaluation key>.json

A policy directory holds adapter/ (adapter_model.safetensors + adapter_config.json),
member.json (schema.Policy), completions.jsonl (the evaluation answers and their rewards) and
checksums.json (sha256 of every other file, checked on load). It is written to a temporary
directory and renamed into place when complete, so a directory with a valid checksum file is a
finished job, and a finished job is never run again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from palm_tasks.config import PalmConfig
from palm_tasks.hashing import file_sha256
from palm_tasks.log import say, warn
from palm_tasks.paths import Paths
from palm_tasks import scores
from palm_tasks.schema import ArtifactError, Policy

MEMBER_FILE = "member.json"
CHECKSUMS = "checksums.json"
ADAPTER_DIR = "adapter"
SOUP_RECIPE = "soup-lora-cat-v1"  # bump when the way adapters are mixed changes
# What a job's result depends on (params.yaml): every stage that runs jobs lists these in dvc.yaml.
JOB_PARAMS = ("task", "traits", "seed", "device", "precision", "data", "training", "evaluation", "rewards")


class CorruptPolicyError(RuntimeError):
    """A policy directory exists but its files do not match its checksums."""


class ChecksumsError(CorruptPolicyError, ArtifactError):
    """A policy's checksums.json cannot be read as the job wrote it (not JSON, not an object of
    file: sha256, a file outside the policy). An ArtifactError naming the file for whoever reads
    the policy; a CorruptPolicyError for find_finished, which trains such a job again."""


# ----------------------------------------------------------------------------- specs and keys


@dataclass(frozen=True)
class JobSpec:
    """Everything that determines an alignment job's result; its hash is the job key."""

    traits: tuple[str, ...]
    weights: tuple[float, ...]
    base_model_sha256: str
    reward_versions: tuple[str, ...]
    data_sha256: str
    training: dict = field(hash=False)
    seed: int = 0
    init_from: str = ""  # key of the policy whose adapter the job starts from ("" : a fresh adapter)
    attempt: int = 0  # 0 for a first training; a repair's attempt k trains with seed + k
    precision: str = "fp32"  # fp32 | bf16 (llm.models.resolve_precision): it decides the answers
    evidence_sha256: str = ""  # rsft that stops once done: the sample pool its rounds are tested against

    @property
    def key(self) -> str:
        payload = asdict(self)
        payload["weights"] = [round(float(x), 9) for x in self.weights]
        if self.precision == "fp32":
            del payload["precision"]  # the keys of jobs trained before precision was a setting
        if not self.evidence_sha256:
            del payload["evidence_sha256"]  # a job whose rounds no test ends
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def soup_key(ingredient_keys: Sequence[str], lambdas, cfg: PalmConfig) -> str:
    payload = {"recipe": SOUP_RECIPE, "ingredients": list(ingredient_keys),
               "lambdas": [round(float(x), 9) for x in lambdas], "seed": cfg.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    """One unit of work for a worker. Paths are relative to the project root."""

    kind: Literal["train", "soup", "evaluate"]
    store: str = "models/members"  # where a train or soup job writes its policy
    weights: tuple[float, ...] = ()  # train
    ingredients: tuple[str, ...] = ()  # soup: the specialists' directories, in trait order
    lambdas: tuple[float, ...] = ()  # soup
    policy: str | None = None  # evaluate: the policy's directory; train: the policy to start from
    attempt: int = 0  # train: 0, or the repair attempt (docs/theory.md section 9)
    prompts: int = 0  # evaluate: measure the policy on at least this many evaluation prompts

    @classmethod
    def train(cls, weights, store: str = "models/members", init_from: str | None = None,
              attempt: int = 0) -> "Job":
        return cls("train", store, weights=tuple(float(x) for x in np.asarray(weights, float)),
                   policy=init_from, attempt=int(attempt))

    @classmethod
    def soup(cls, ingredient_dirs: Sequence[str], lambdas, store: str = "models/soups") -> "Job":
        return cls("soup", store, ingredients=tuple(ingredient_dirs),
                   lambdas=tuple(float(x) for x in lambdas))

    @classmethod
    def evaluate(cls, policy_dir: str, prompts: int, store: str = "models/members") -> "Job":
        """Measure a stored policy on at least `prompts` prompts; `store` is the running stage's
        job store: a policy outside it keeps its new chunks in <store>/../scores (scores.chunk_dirs)."""
        return cls("evaluate", store, policy=policy_dir, prompts=int(prompts))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def describe(self) -> str:
        if self.kind == "train":
            how = f"repair {self.attempt}" if self.attempt else "warm"
            more = f" ({how}, from {Path(self.policy).name})" if self.policy else ""
            return f"train w={_fmt(self.weights)}{more}"
        if self.kind == "soup":
            return f"soup lambda={_fmt(self.lambdas)}"
        return f"evaluate {Path(self.policy or '').name} on {self.prompts} prompts"


RunJobs = Callable[[list[Job]], list[Policy]]


# ----------------------------------------------------------------------------- the store


def store_policy(tmp: Path, final: Path, policy: Policy, chunks) -> Policy:
    """Finish a policy directory written under `tmp` (its adapter and its first measured chunks
    are there): the answers, member.json and checksums, then one rename into `final`, so a
    reader sees all or nothing. The chunks under evaluations/ carry their own checksums."""
    with open(tmp / "completions.jsonl", "w") as fh:
        for chunk in chunks:
            for p, c, s in zip(chunk.prompts, chunk.completions, chunk.rewards):
                fh.write(json.dumps({"prompt": p, "completion": c,
                                     "rewards": dict(zip(policy.traits, np.round(s, 6).tolist()))}) + "\n")
    (tmp / MEMBER_FILE).write_text(json.dumps(replace(policy, scores=None).to_json(), indent=2))
    sums = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS and p.relative_to(tmp).parts[0] != scores.EVALUATIONS}
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return replace(load_policy(final), scores=policy.scores)


def load_policy(path: Path, verify: bool = True) -> Policy:
    """Read a finished policy; `CorruptPolicyError` names it and the bad file (a `ChecksumsError`,
    also a schema.ArtifactError, when checksums.json itself is garbage)."""
    path = Path(path)
    sums_path = path / CHECKSUMS
    if not sums_path.is_file():
        raise CorruptPolicyError(f"policy {path.name}: {CHECKSUMS} missing (unfinished or damaged job)")
    if verify:
        for rel, digest in read_checksums(sums_path).items():
            f = path / rel
            if not f.is_file():
                raise CorruptPolicyError(f"policy {path.name}: {rel} is missing")
            if file_sha256(f) != digest:
                raise CorruptPolicyError(f"policy {path.name}: {rel} does not match its checksum")
    try:
        data = json.loads((path / MEMBER_FILE).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {type(data).__name__}")
        return Policy.from_json(data, path)
    except (KeyError, TypeError, ValueError, OSError, RecursionError) as exc:
        raise CorruptPolicyError(f"policy {path.name}: {MEMBER_FILE} is unreadable ({str(exc)[:200]})") from None


def read_checksums(sums_path: Path) -> dict[str, str]:
    """A policy's checksums.json: {file relative to the policy: sha256}, or ChecksumsError naming it."""
    def damaged(problem: str) -> ChecksumsError:
        return ChecksumsError(f"policy {sums_path.parent.name}: {sums_path} {problem} (a damaged job)")

    try:
        sums = json.loads(sums_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise damaged(f"is not valid JSON ({str(exc)[:100]})") from None
    except RecursionError:
        raise damaged("is nested too deeply to be a checksum file") from None
    except OSError as exc:
        raise damaged(f"cannot be read ({exc.strerror or exc})") from None
    if not isinstance(sums, dict):
        raise damaged(f"is not an object of file: sha256 (it is {type(sums).__name__})")
    for rel, digest in sums.items():
        if not isinstance(digest, str):
            raise damaged(f"gives {type(digest).__name__}, not a sha256, for {rel[:100]!r}")
        parts = Path(rel).parts
        if not rel or "\x00" in rel or Path(rel).is_absolute() or ".." in parts:
            raise damaged(f"names {rel[:100]!r}, not a file inside the policy")
    return sums


def find_finished(store: Path, key: str, redo: str = "it will be run again") -> Policy | None:
    """The finished policy with this key, or None. A damaged one is removed so it is redone."""
    path = Path(store) / key
    if not path.is_dir():
        return None
    try:
        return load_policy(path)
    except CorruptPolicyError as exc:
        warn(f"{exc}; {redo}")
        shutil.rmtree(path)
        return None


def remove_half_written(store: Path) -> None:
    """Temporary directories of jobs a killed run left behind."""
    for stale in Path(store).glob(".*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _workdir(store: Path, key: str) -> Path:
    tmp = Path(store) / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


# ----------------------------------------------------------------------------- running a job


class JobContext:
    """What every job of one project and configuration shares: hashes, prompts, rewards."""

    def __init__(self, cfg: PalmConfig, root: Path):
        from palm_tasks.llm.base_model import base_info, resolve_base_model
        from palm_tasks.llm.models import resolve_device, resolve_precision
        from palm_tasks.llm.prompts import read_prompts
        from palm_tasks.llm.rewards import project_rewards

        self.cfg, self.paths = cfg, Paths(Path(root))
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.base_path = resolve_base_model(self.paths.base)
        self.base_sha = base_info(self.paths.base)["weights_sha256"]
        h = hashlib.sha256()
        for name in ("train.jsonl", "eval.jsonl"):
            h.update((self.paths.prompts / name).read_bytes())
        self.data_sha = h.hexdigest()
        self.eval_sha = hashlib.sha256((self.paths.prompts / "eval.jsonl").read_bytes()).hexdigest()
        self.train_prompts = read_prompts(self.paths.prompts / "train.jsonl")
        self.eval_prompts = read_prompts(self.paths.prompts / "eval.jsonl")
        self.rewards = project_rewards(cfg, self.paths.root, self.device)
        self.reward_versions = tuple(r.version for r in self.rewards)

    def spec(self, weights: Sequence[float], init_from: str = "", attempt: int = 0) -> JobSpec:
        from palm_tasks.core.simplex import check_weights

        w = check_weights(np.asarray(weights, float), self.cfg.d)
        spec = JobSpec(traits=tuple(self.cfg.traits), weights=tuple(float(x) for x in w),
                       base_model_sha256=self.base_sha, reward_versions=self.reward_versions,
                       data_sha256=self.data_sha, training=self.cfg.training.model_dump(), seed=self.cfg.seed,
                       init_from=init_from, attempt=int(attempt), precision=self.precision)
        return replace(spec, evidence_sha256=self.evidence_sha) if self.rounds_tested else spec

    @functools.cached_property
    def evidence(self):
        """The base's sample pool on the eval prompts (schema.SamplePool), None if missing or
        made with other rewards."""
        from palm_tasks.schema import ArtifactError, load_samples

        try:
            pool = load_samples(self.paths.root, "eval")
        except ArtifactError:
            return None
        return pool if pool.reward_versions == self.reward_versions else None

    @functools.cached_property
    def evidence_sha(self) -> str:
        return file_sha256(self.paths.samples / "eval.json")

    @functools.cached_property
    def rounds_tested(self) -> bool:
        """Whether an rsft job of these settings is tested after its rounds (round_stop.look_prompts)."""
        from palm_tasks.round_stop import look_prompts

        return self.evidence is not None and look_prompts(self.cfg, self.evidence, self.eval_prompts) is not None

    def look(self, spec: JobSpec):
        """rsft's test after each round of this job (palm_tasks.round_stop), or None."""
        from palm_tasks.round_stop import round_stop

        if not self.rounds_tested:
            return None
        return round_stop(self.cfg, self.evidence, self.eval_prompts, self.rewards, spec.weights,
                          spec.seed + spec.attempt, label=spec.key[:10])

    def first_round(self):
        """rsft: the base's answers to the training prompts (data/samples/train.json), as
        (completions, scores); None if the pool is missing or was made for other prompts."""
        from palm_tasks.schema import ArtifactError, load_samples

        try:
            pool = load_samples(self.paths.root, "train")
        except ArtifactError:
            return None
        if list(pool.prompts) != self.train_prompts or pool.reward_versions != self.reward_versions:
            return None
        return [list(c) for c in pool.completions], pool.scores

    def evaluation_key(self) -> str:
        """Hash of everything that decides a chunk's answers and rewards (not a training, not
        the cap or how many prompts are measured at once): tables of one key are comparable."""
        payload = {"traits": list(self.cfg.traits), "base_model_sha256": self.base_sha,
                   "reward_versions": list(self.reward_versions), "eval_sha256": self.eval_sha,
                   "evaluation": self.cfg.evaluation.answers_key(), "seed": self.cfg.seed}
        if self.precision != "fp32":  # fp32 tables of earlier runs keep their key
            payload["precision"] = self.precision
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def measured(self, policy: Policy, store: Path, prompts: int) -> Policy:
        """`policy` with its table at the current evaluation key on at least `prompts` prompts:
        the chunks found, the rest measured (the model loaded only if some are missing). Chunks of
        a policy outside `store` go to <store>/../scores (scores.chunk_dirs)."""
        home = None if Path(policy.path).resolve().parent == Path(store).resolve() else Path(store).parent / "scores"
        dirs, write_dir = scores.chunk_dirs(policy.path, policy.key, self.evaluation_key(), home)
        wanted = -(-min(prompts, self.cap) // self.cfg.evaluation.chunk_prompts)
        chunks = scores.read_chunks(dirs, self.evaluation_key(), wanted)
        if len(chunks) < wanted:
            from palm_tasks.llm.models import load_policy as load_model

            model, tokenizer = load_model(self.base_path, policy.adapter, self.device, self.precision)
            return policy.with_scores(scores.measure(self, model, tokenizer, dirs, write_dir, prompts,
                                                     label=policy.key[:10]))
        return policy.with_scores(scores.table_of(chunks, self.cfg.traits, self.evaluation_key(),
                                                  self.cfg.evaluation.samples_per_prompt))

    @property
    def cap(self) -> int:
        """The most evaluation prompts a policy is measured on."""
        return min(self.cfg.evaluation.n_prompts, len(self.eval_prompts))


def run_job(cfg: PalmConfig, root: Path, job: Job, ctx: JobContext | None = None) -> Policy:
    """Run one job, or return its finished result."""
    ctx = ctx or JobContext(cfg, root)
    return {"train": _train, "soup": _soup, "evaluate": _evaluate}[job.kind](ctx, job)


def run_here(cfg: PalmConfig, root: Path) -> RunJobs:
    """A job runner without an orchestrator: one job after another in this process."""
    ctx: list[JobContext] = []

    def run(jobs: list[Job]) -> list[Policy]:
        if not ctx:
            ctx.append(JobContext(cfg, root))
        return [run_job(cfg, root, j, ctx[0]) for j in jobs]

    return run


def _train(ctx: JobContext, job: Job) -> Policy:
    from palm_tasks import tracking
    from palm_tasks.llm.train import train

    start = load_policy(ctx.paths.root / job.policy) if job.policy else None
    spec, paths = ctx.spec(job.weights, start.key if start else "", job.attempt), ctx.paths
    store = paths.root / job.store
    done = find_finished(paths.members, spec.key) or find_finished(store, spec.key)
    first = ctx.cfg.evaluation.first_prompts
    if done is not None:
        say(f"align: {spec.key} w={_fmt(spec.weights)} finished earlier, reused")
        return ctx.measured(done, store, first)
    t = ctx.cfg.training
    how = f"{t.rounds} rsft rounds" if t.method == "rsft" else f"{t.steps} GRPO steps"
    if t.method == "rsft" and spec.evidence_sha256:
        how = f"at most {how}, fewer once not short of best-of-N"
    if start:
        how += (f", repair {job.attempt}" if job.attempt else ", warm") + f" starting from {start.key}"
    say(f"align: training {spec.key} w={_fmt(spec.weights)} ({how})")
    tmp = _workdir(store, spec.key)
    checkpoints = paths.round_checkpoints / spec.key  # outlives a kill: the rounds it finished
    if any(checkpoints.glob("round-*")):
        say(f"align: {spec.key} resumes after its last finished round")
    run = tracking.JobRun.open(ctx.cfg, paths.root, spec, ctx.device, store)
    started = time.time()
    try:
        model, tokenizer, history = train(
            ctx.base_path, ctx.rewards, ctx.train_prompts, spec.weights, t, ctx.device,
            spec.seed + spec.attempt, tmp / "trainer", on_log=run.on_log(spec.key),
            first_round=None if start else ctx.first_round(),
            init_adapter=start.adapter if start else None, precision=ctx.precision, look=ctx.look(spec),
            checkpoints=checkpoints)
        model.save_pretrained(tmp / ADAPTER_DIR)  # adapter_model.safetensors + adapter_config.json
        train_seconds = time.time() - started
        chunks_dir = tmp / scores.EVALUATIONS / ctx.evaluation_key()
        table = scores.measure(ctx, model, tokenizer, [chunks_dir], chunks_dir, first, label=spec.key[:10])
        final = history[-1] if history else {}
        policy = Policy(key=spec.key, kind="trained", traits=spec.traits, weights=spec.weights, value=table.value,
                        quality=dict(table.quality), scores=table,
                        training={"job": asdict(spec), "method": t.method, "device": ctx.device,
                                  "precision": ctx.precision,
                                  "train_seconds": round(train_seconds, 2),
                                  "total_seconds": round(time.time() - started, 2),
                                  "final_reward": final.get("reward", final.get("kept_reward")),
                                  "history": history if t.method == "rsft" else [],
                                  "mlflow_run_id": run.run_id,
                                  "eval_key": ctx.evaluation_key(),
                                  "worker": {"host": socket.gethostname(), "pid": os.getpid()}})
        policy = store_policy(tmp, store / spec.key, policy, scores.read_chunks([chunks_dir], ctx.evaluation_key()))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        run.fail()
        raise
    shutil.rmtree(checkpoints, ignore_errors=True)  # the job is stored: its rounds are no longer needed
    run.finish(policy, len(history) if t.method == "rsft" else t.steps)
    value = policy.value
    say(f"align: {spec.key} done, value {_fmt(value.mean)} ± {_fmt(value.se)} on {table.prompts} prompts, "
        f"{table.quality['degenerate_share']:.1%} degenerate answers, in {policy.training['total_seconds']:.0f}s")
    return policy


def _soup(ctx: JobContext, job: Job) -> Policy:
    """A Rewarded-Soups candidate: the specialists' adapters mixed, measured up to the cap (a
    soup is evaluated, not trained: nothing decides how far it is measured but the cap)."""
    from palm_tasks.llm.models import load_policy as load_model
    from palm_tasks.llm.soups import mix_adapters

    ingredients = [load_policy(ctx.paths.root / p) for p in job.ingredients]
    key = soup_key([m.key for m in ingredients], job.lambdas, ctx.cfg)
    store = ctx.paths.root / job.store
    redo = "the soup will be rebuilt"
    done = find_finished(ctx.paths.soups, key, redo) or find_finished(store, key, redo)
    if done is not None:
        say(f"soups: {key} lambda={_fmt(job.lambdas)} finished earlier, reused")
        return ctx.measured(done, store, ctx.cap)
    tmp = _workdir(store, key)
    started = time.time()
    try:
        mix_adapters([m.adapter for m in ingredients], job.lambdas, tmp / ADAPTER_DIR)
        model, tokenizer = load_model(ctx.base_path, tmp / ADAPTER_DIR, ctx.device, ctx.precision)
        chunks_dir = tmp / scores.EVALUATIONS / ctx.evaluation_key()
        table = scores.measure(ctx, model, tokenizer, [chunks_dir], chunks_dir, ctx.cap, label=key[:10])
        # sum_i lambda_i w_i: where the soup is meant to sit, not a weight it was trained for
        weights = np.sum([lam * m.w for lam, m in zip(job.lambdas, ingredients)], axis=0)
        policy = Policy(key=key, kind="soup", traits=tuple(ctx.cfg.traits),
                        weights=tuple(float(x) for x in weights), value=table.value, quality=dict(table.quality),
                        scores=table, ingredients=tuple(m.key for m in ingredients), lambdas=job.lambdas,
                        training={"recipe": SOUP_RECIPE, "eval_key": ctx.evaluation_key(),
                                  "seed": ctx.cfg.seed, "device": ctx.device,
                                  "base_model_sha256": ingredients[0].base_model_sha256,
                                  "total_seconds": round(time.time() - started, 2)})
        policy = store_policy(tmp, store / key, policy, scores.read_chunks([chunks_dir], ctx.evaluation_key()))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"soups: {key} lambda={_fmt(job.lambdas)} value {_fmt(policy.value.mean)} ± {_fmt(policy.value.se)}")
    return policy


def _evaluate(ctx: JobContext, job: Job) -> Policy:
    """The policy measured on at least job.prompts prompts under the current rewards and eval
    prompts (its chunks found, the missing ones measured)."""
    policy = load_policy(ctx.paths.root / job.policy)
    return ctx.measured(policy, ctx.paths.root / job.store, job.prompts)


def _fmt(x) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in x) + ")"
