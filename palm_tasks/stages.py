"""The five pipeline stages as plain functions: rewards -> grid -> align -> coverage -> register.

Each stage reads its inputs from files under the project root, writes its outputs there (the
paths dvc.yaml declares, see `Layout`) and logs to MLflow. Prefect flows (flows/) and the DVC
stages both call these functions; nothing here imports Prefect. The align stage takes a
`run_jobs` callable so that the orchestrator decides how jobs run (threads, a cluster); by
default they run one after another in this process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from palm_tasks import grid as gridlib
from palm_tasks.align import JobSpec, Member, find_member, load_member, train_member
from palm_tasks.config import PalmConfig
from palm_tasks.layout import Layout

MAX_GRID_POINTS_STORED = 200_000
STAGES = ("rewards", "grid", "align", "soups", "coverage", "register")
RELATIVE_TO = (
    "the alignment oracle: each trained member's value vector is taken as optimal for its "
    "training weight; values are means over the eval prompts"
)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)  # readers never see half a file


def _read_json(path: Path, stage: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `palm stage {stage}` first")
    return json.loads(path.read_text())


def say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[bold cyan]palm[/] {message}")


# ------------------------------------------------------------------------------------ rewards


def rewards_stage(cfg: PalmConfig, root: Path) -> dict:
    """Base model, prompt split, reward models; score base-model samples to see the trade-off."""
    from palm_tasks.base_model import prepare_base_model, resolve_base_model
    from palm_tasks.prompts import prepare_prompts, read_prompts
    from palm_tasks.align import resolve_device
    from palm_tasks.rewards import build_rewards, prepare_rewards
    from palm_tasks.tracking import lineage_tags, setup_mlflow

    lay = Layout(root)
    say(f"rewards: preparing base model {cfg.base_model!r}")
    base = prepare_base_model(cfg.base_model, lay.base)
    say("rewards: splitting prompts")
    split_seed = cfg.seed if cfg.data.split_seed is None else cfg.data.split_seed
    prompts = prepare_prompts(cfg.task, lay.prompts, cfg.data.n_train, cfg.data.n_eval, split_seed)
    say("rewards: preparing reward functions")
    reward_metrics = prepare_rewards(cfg.traits, lay.reward_models, cfg.seed, cfg.rewards.models)
    rewards = build_rewards(cfg.traits, lay.reward_models, cfg.rewards.brevity_max_words,
                            cfg.rewards.models, resolve_device(cfg.device))

    say(f"rewards: scoring {cfg.rewards.base_samples} base-model samples")
    eval_prompts = read_prompts(lay.prompts / "eval.jsonl")
    scores, completions = _score_base_model(cfg, resolve_base_model(lay.base), rewards, eval_prompts)
    corr = _correlation(scores)
    distribution = {
        t: {"mean": float(s.mean()), "std": float(s.std()), "min": float(s.min()),
            "p10": float(np.quantile(s, 0.1)), "median": float(np.median(s)),
            "p90": float(np.quantile(s, 0.9)), "max": float(s.max())}
        for t, s in zip(cfg.traits, scores.T)
    }
    metrics = {
        "base_model": base,
        "prompts": prompts,
        "reward_models": reward_metrics,
        "normalization": {r.name: r.normalization for r in rewards},
        "reward_versions": {r.name: r.version for r in rewards},
        "base_samples": len(completions),
        "distribution": distribution,
        "correlation": {"traits": cfg.traits, "matrix": corr.round(4).tolist()},
    }
    _write_json(lay.metrics / "rewards.json", metrics)
    lay.plots.mkdir(parents=True, exist_ok=True)
    _write_json(lay.plots / "base_rewards.json",
                [dict(zip(cfg.traits, row.round(4).tolist())) for row in scores])

    import mlflow

    setup_mlflow(cfg, root)
    with mlflow.start_run(run_name="rewards", tags={"palm.stage": "rewards", **lineage_tags(root)}):
        mlflow.log_params({"base_model": cfg.base_model, "task": cfg.task,
                           "traits": ",".join(cfg.traits), "seed": cfg.seed,
                           "n_train": cfg.data.n_train, "n_eval": cfg.data.n_eval})
        flat = {f"{t}.{k}": v for t, d in distribution.items() for k, v in d.items()}
        for i, a in enumerate(cfg.traits):
            for j, b in enumerate(cfg.traits):
                if i < j:
                    flat[f"corr.{a}.{b}"] = float(corr[i, j])
        if "humor" in reward_metrics:
            flat["humor.heldout_accuracy"] = reward_metrics["humor"]["heldout_accuracy"]
        mlflow.log_metrics(flat)
        mlflow.log_dict(metrics, "rewards.json")
        mlflow.log_figure(_distribution_figure(cfg.traits, scores, corr), "reward_distributions.png")
        mlflow.log_table({"prompt": eval_prompts[: len(completions)], "completion": completions,
                          **{t: scores[:, i].tolist() for i, t in enumerate(cfg.traits)}},
                         "base_samples.json")
    return metrics


def _score_base_model(cfg, base_path, rewards, eval_prompts):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palm_tasks.align import generate, resolve_device
    from palm_tasks.rewards import score_all

    device = resolve_device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).to(device)
    prompts = [eval_prompts[i % len(eval_prompts)] for i in range(cfg.rewards.base_samples)]
    completions = generate(model, tokenizer, prompts, cfg.evaluation.max_new_tokens,
                           cfg.evaluation.temperature, cfg.evaluation.batch_size, cfg.seed)
    return score_all(rewards, prompts, completions), completions


def _correlation(scores: np.ndarray) -> np.ndarray:
    """Pearson correlation between traits; a constant trait correlates 0 with the others."""
    centered = scores - scores.mean(axis=0)
    norms = np.linalg.norm(centered, axis=0)
    safe = np.where(norms > 0, norms, 1.0)
    corr = (centered.T @ centered) / np.outer(safe, safe)
    corr[norms == 0, :] = 0.0
    corr[:, norms == 0] = 0.0
    np.fill_diagonal(corr, 1.0)
    return corr


def _distribution_figure(traits, scores, corr):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traits) + 1, figsize=(3.2 * (len(traits) + 1), 3))
    for ax, t, s in zip(axes, traits, scores.T):
        ax.hist(s, bins=20, range=(0, 1), color="tab:blue")
        ax.set_title(f"{t} (base model)")
    im = axes[-1].imshow(corr, vmin=-1, vmax=1, cmap="coolwarm")
    axes[-1].set_xticks(range(len(traits)), traits, rotation=45)
    axes[-1].set_yticks(range(len(traits)), traits)
    axes[-1].set_title("trait correlation")
    fig.colorbar(im, ax=axes[-1])
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------- grid


def grid_stage(cfg: PalmConfig, root: Path) -> dict:
    """The PALM grid of theory.md section 2, its proven size bound, and the baseline weights."""
    d, eps, delta = cfg.d, cfg.coverage.eps, cfg.coverage.delta
    points = gridlib.palm_grid(d, eps, delta)
    bound = gridlib.grid_size_bound(d, eps, delta)
    k = cfg.search.k
    out = {
        "traits": cfg.traits, "eps": eps, "delta": delta,
        "size": int(len(points)), "bound": int(bound),
        # Millions of points at d >= 4: the file then records the size only.
        "points": points.round(9).tolist() if len(points) <= MAX_GRID_POINTS_STORED else None,
        "uniform": gridlib.uniform_weights(d, k).round(9).tolist(),
        "random": gridlib.random_weights(d, k, cfg.seed).round(9).tolist(),
    }
    lay = Layout(root)
    _write_json(lay.grid, out)
    metrics = {"grid_size": out["size"], "grid_size_bound": out["bound"]}
    _write_json(lay.metrics / "grid.json", metrics)
    say(f"grid: {out['size']} PALM grid points (proven bound {out['bound']}) for d={d}, "
        f"eps={eps}, delta={delta}")
    return metrics


# -------------------------------------------------------------------------------------- align


def _data_sha256(lay: Layout) -> str:
    h = hashlib.sha256()
    for name in ("train.jsonl", "eval.jsonl"):
        h.update((lay.prompts / name).read_bytes())
    return h.hexdigest()


class JobFactory:
    """Turns weight vectors into job specs and runs them, reusing finished members."""

    def __init__(self, cfg: PalmConfig, root: Path):
        from palm_tasks.align import resolve_device
        from palm_tasks.base_model import base_info
        from palm_tasks.rewards import build_rewards

        self.cfg, self.lay = cfg, Layout(root)
        self.base_sha = base_info(self.lay.base)["weights_sha256"]
        self.data_sha = _data_sha256(self.lay)
        self.rewards = build_rewards(cfg.traits, self.lay.reward_models, cfg.rewards.brevity_max_words,
                                     cfg.rewards.models, resolve_device(cfg.device))
        self.reward_versions = tuple(r.version for r in self.rewards)

    def spec(self, weights: Sequence[float]) -> JobSpec:
        w = gridlib.check_weights(np.asarray(weights, float), self.cfg.d)
        return JobSpec(
            traits=tuple(self.cfg.traits), weights=tuple(float(x) for x in w),
            base_model_sha256=self.base_sha, reward_versions=self.reward_versions,
            data_sha256=self.data_sha, training=self.cfg.training.model_dump(),
            evaluation=self.cfg.evaluation.model_dump(), seed=self.cfg.seed,
        )

    def finished(self, spec: JobSpec) -> Member | None:
        return find_member(self.lay.members, spec.key)


def run_job(cfg: PalmConfig, root: Path, weights: Sequence[float], members_dir: Path | None = None) -> Member:
    """One alignment job for `weights`, or the finished member if it exists already.

    `members_dir`: train into it instead of models/members, looking in both for a finished job
    (the evaluate stage's own job cache, so that it never changes the align stage's output)."""
    from palm_tasks.base_model import resolve_base_model
    from palm_tasks.prompts import read_prompts
    from palm_tasks.tracking import setup_mlflow

    jobs = JobFactory(cfg, root)
    spec = jobs.spec(weights)
    done = jobs.finished(spec) or (find_member(Path(members_dir), spec.key) if members_dir else None)
    if done is not None:
        say(f"align: {spec.key} w={_fmt(spec.weights)} finished earlier, reused")
        return done
    say(f"align: training {spec.key} w={_fmt(spec.weights)} ({cfg.training.steps} GRPO steps)")
    import mlflow

    experiment_id = setup_mlflow(cfg, root)
    lay = jobs.lay
    member = train_member(
        spec, cfg, resolve_base_model(lay.base), jobs.rewards,
        read_prompts(lay.prompts / "train.jsonl"), read_prompts(lay.prompts / "eval.jsonl"),
        Path(members_dir) if members_dir else lay.members, mlflow.MlflowClient(), experiment_id,
    )
    say(f"align: {spec.key} done, value {_fmt(member.values)} ± {_fmt(member.std_errors)} "
        f"in {member.info['total_seconds']:.0f}s")
    return member


def _fmt(x) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in x) + ")"


RunJobs = Callable[[list[list[float]]], list[Member]]


def align_stage(cfg: PalmConfig, root: Path, run_jobs: RunJobs | None = None) -> dict:
    """Train the members the search mode asks for; record the pool in metrics/align.json.

    `run_jobs(list of weight vectors) -> members` runs a batch of independent jobs; the lazy
    search calls it with one weight at a time because each choice depends on the last result.
    """
    if run_jobs is None:
        run_jobs = lambda ws: [run_job(cfg, root, w) for w in ws]  # noqa: E731
    lay = Layout(root)
    s, d = cfg.search, cfg.d
    for stale in lay.members.glob(".*.tmp-*"):  # half-written jobs of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    finished_before = {p.name for p in lay.members.glob("*")} if lay.members.is_dir() else set()
    history = None
    if s.mode == "lazy":
        from palm_tasks.coverage import lazy_search

        members = []

        def oracle(w):
            (member,) = run_jobs([np.asarray(w, float).tolist()])
            members.append(member)
            return member.values, member.std_errors

        result = lazy_search(oracle, d, cfg.coverage.eps, cfg.coverage.delta, s.max_trainings,
                             z=cfg.coverage.z)
        history = {"stopped": result.stopped, "steps": result.to_dict().get("history")}
    else:
        weights = _mode_weights(cfg)
        if len(weights) > s.max_trainings:
            raise ValueError(
                f"search.mode = {s.mode!r} asks for {len(weights)} trainings, more than "
                f"search.max_trainings = {s.max_trainings}; raise the budget or use search.mode: lazy"
            )
        members = run_jobs([list(w) for w in weights])
    out = {
        "mode": s.mode,
        "pool": [m.key for m in members],
        "weights": [m.weights.tolist() for m in members],
        "jobs": len(members),
        "trained": sum(m.key not in finished_before for m in members),
        "reused": sum(m.key in finished_before for m in members),
        "history": history,
    }
    _write_json(lay.metrics / "align.json", out)
    say(f"align: pool of {len(members)} members ({s.mode} search)")
    return out


def _mode_weights(cfg: PalmConfig) -> np.ndarray:
    s, d = cfg.search, cfg.d
    if s.mode == "coarse":
        w = np.vstack([gridlib.extreme_weights(d), gridlib.simplex_lattice(d, s.coarse_divisions)])
        return np.unique(w.round(12), axis=0)
    if s.mode == "grid":
        return gridlib.palm_grid(d, cfg.coverage.eps, cfg.coverage.delta)
    if s.mode == "uniform":
        return gridlib.uniform_weights(d, s.k)
    if s.mode == "random":
        return gridlib.random_weights(d, s.k, cfg.seed)
    raise ValueError(f"search.mode = {s.mode!r}: unknown")


# -------------------------------------------------------------------------------------- soups


def soups_stage(cfg: PalmConfig, root: Path) -> dict:
    """Rewarded-Soups candidates of the pool's specialists, evaluated like members
    (palm_tasks.soups); their keys go to metrics/soups.json for the coverage stage."""
    from palm_tasks.base_model import resolve_base_model
    from palm_tasks.prompts import read_prompts
    from palm_tasks.soups import make_soups

    lay = Layout(root)
    pool = load_pool(root)
    rewards = JobFactory(cfg, root).rewards if cfg.soups.enabled else []
    made = make_soups(cfg, resolve_base_model(lay.base) if cfg.soups.enabled else None, pool, rewards,
                      read_prompts(lay.prompts / "eval.jsonl"), lay.soups, say)
    out = {
        "enabled": cfg.soups.enabled,
        "ingredients": made["ingredients"],
        "soups": [m.key for m in made["soups"]],
        "lambdas": [m.info["lambdas"] for m in made["soups"]],
        "values": [m.values.tolist() for m in made["soups"]],
        "std_errors": [m.std_errors.tolist() for m in made["soups"]],
        "built": made["built"],
        "reused": made["reused"],
        "skipped": made["skipped"],
    }
    lay.soups.mkdir(parents=True, exist_ok=True)  # a DVC output, even when empty
    _write_json(lay.metrics / "soups.json", out)
    say(f"soups: {len(out['soups'])} soups ({out['built']} evaluated, {out['reused']} reused)"
        + (f"; none: {made['skipped']}" if made["skipped"] else ""))
    return out


# ----------------------------------------------------------------------------------- coverage


def load_pool(root: Path) -> list[Member]:
    """The members the align stage trained or reused, in its order."""
    lay = Layout(root)
    align = _read_json(lay.metrics / "align.json", "align")
    pool = [load_member(lay.member(k)) for k in align["pool"]]
    # Members kept by a retraining run count with their values under the current rewards and
    # eval data (palm_tasks.retrain), not the ones measured when they were trained.
    for m in pool:
        if m.key in align.get("evaluations", {}):
            from palm_tasks.retrain import read_evaluation

            m.values, m.std_errors = read_evaluation(m, align["evaluations"][m.key])
    return pool


def load_soups(root: Path) -> list[Member]:
    """The soups the soups stage evaluated (metrics/soups.json), none if it has not run."""
    lay = Layout(root)
    if not (lay.metrics / "soups.json").is_file():
        return []
    return [load_member(lay.soups / k) for k in _read_json(lay.metrics / "soups.json", "soups")["soups"]]


def _candidate_info(m: Member, lay: Layout) -> dict:
    """Where a portfolio entry lives and, for a soup, what it mixes."""
    if m.info.get("kind") == "soup":
        return {"kind": "soup", "path": str((lay.soups / m.key).relative_to(lay.root)),
                "ingredients": m.info["ingredients"], "lambdas": m.info["lambdas"]}
    return {"kind": "member", "path": str(lay.member(m.key).relative_to(lay.root))}


def coverage_stage(cfg: PalmConfig, root: Path) -> dict:
    """Certificate over the simplex, set-cover pruning, gaps on test weights -> portfolio.json."""
    from palm_tasks import coverage as cov

    lay = Layout(root)
    trained = load_pool(root)
    soups = load_soups(root)  # free candidates (theory.md section 5): may serve users, never oracle rows
    pool = trained + soups
    oracle = np.array([True] * len(trained) + [False] * len(soups))
    c = cfg.coverage
    W = np.array([m.weights for m in pool])
    R = np.array([m.values for m in pool])
    SE = np.array([m.std_errors for m in pool])
    members = np.asarray(cov.prune(W, R, c.eps, c.delta, std_errors=SE, z=c.z, oracle=oracle), int)
    cert = cov.certify(W, R, c.eps, c.delta, members=members, std_errors=SE, z=c.z, oracle=oracle)
    pool_cert = cov.certify(W, R, c.eps, c.delta, std_errors=SE, z=c.z, oracle=oracle)
    # The same members with noise taken into account: values - z se, oracle bounds + z se.
    noisy = cov.certify(W, R, c.eps, c.delta, members=members, std_errors=SE, z=c.z_conservative,
                        oracle=oracle)
    # The certificate trusts each trained policy to be optimal at its weight; say where the pool
    # itself already contradicts that (another candidate is better there).
    check = cov.oracle_check(W, R, SE, oracle)

    lattice = gridlib.simplex_lattice(cfg.d, c.test_lattice)
    users = gridlib.dirichlet_users(cfg.d, c.test_users, cfg.seed)
    test = np.vstack([lattice, users])
    gap = cov.gaps(R, members, test)
    gap_users = cov.gaps(R, members, users)
    routed = members[np.argmax(users @ R[members].T, axis=1)]
    share = {int(j): float(np.mean(routed == j)) for j in members}
    perplexity = float(cov.usage_perplexity(R, members, users))

    cert_dict = cert.to_dict()
    cert_dict["relative_to"] = RELATIVE_TO
    summary = {
        "test_weights": int(len(test)),
        "test_weights_are": f"a simplex lattice of step 1/{c.test_lattice} ({len(lattice)}) plus "
                            f"{len(users)} Dirichlet(1) users; gaps relative to the best of the "
                            f"candidates ({len(trained)} trained, {len(soups)} soups)",
        "max_multiplicative_gap": gap.max_multiplicative,
        "mean_multiplicative_gap": gap.mean_multiplicative,
        "max_additive_gap": gap.max_additive,
        "mean_additive_gap": gap.mean_additive,
        "users_mean_multiplicative_gap": gap_users.mean_multiplicative,
        "usage_perplexity": perplexity,
    }
    key = json.dumps({"members": sorted(pool[j].key for j in members), "eps": c.eps,
                      "delta": c.delta, "z": c.z}, sort_keys=True)
    portfolio = {
        "id": hashlib.sha256(key.encode()).hexdigest()[:16],
        "task": cfg.task,
        "traits": cfg.traits,
        "eps": c.eps, "delta": c.delta, "z": c.z,
        "members": [
            {"key": pool[j].key,
             "weights": dict(zip(cfg.traits, pool[j].weights.round(6).tolist())),
             "values": dict(zip(cfg.traits, pool[j].values.round(6).tolist())),
             "std_errors": dict(zip(cfg.traits, pool[j].std_errors.round(6).tolist())),
             "share": round(share[int(j)], 6), **_candidate_info(pool[j], lay)}
            for j in members
        ],
        "pool": [m.key for m in trained],
        "soups": {"candidates": [m.key for m in soups],
                  "in_portfolio": int((~oracle[members]).sum()),
                  "candidate_share": len(soups) / len(pool)},
        "certificate": cert_dict,
        "pool_certificate": {"certified": bool(pool_cert.certified),
                             "max_eps": float(pool_cert.max_eps),
                             "max_delta": float(pool_cert.max_delta)},
        "conservative_certificate": {"z": c.z_conservative, "certified": bool(noisy.certified),
                                     "worst_slack": float(noisy.worst_slack),
                                     "max_eps": float(noisy.max_eps),
                                     "max_delta": float(noisy.max_delta)},
        "oracle_check": check.to_dict(),
        "coverage": summary,
        # The trained pool, all oracle rows: what the router needs for the per-weight bound.
        "oracle": {"keys": [m.key for m in trained], "weights": W[oracle].tolist(),
                   "values": R[oracle].tolist(), "std_errors": SE[oracle].tolist()},
    }
    _write_json(lay.portfolio, portfolio)
    metrics = {
        "portfolio_size": len(members), "pool_size": len(trained),
        "soup_candidates": len(soups), "soups_in_portfolio": int((~oracle[members]).sum()),
        "soup_candidate_share": len(soups) / len(pool),
        "certified": bool(cert.certified), "worst_slack": float(cert.worst_slack),
        "max_eps": float(cert.max_eps), "max_delta": float(cert.max_delta),
        "conservative_certified": bool(noisy.certified),
        "conservative_max_eps": float(noisy.max_eps),
        "conservative_max_delta": float(noisy.max_delta),
        "oracle_rows_beaten": check.n_beaten,
        "oracle_max_shortfall": float(check.shortfall.max()),
        **{k: v for k, v in summary.items() if isinstance(v, (int, float))},
    }
    _write_json(lay.metrics / "coverage.json", metrics)
    _write_json(lay.plots / "gaps.json", [
        {"w": dict(zip(cfg.traits, w.round(4).tolist())), "multiplicative_gap": float(m),
         "additive_gap": float(a)}
        for w, m, a in zip(lattice, gap.multiplicative, gap.additive)
    ])
    from palm_tasks.plots import write_plots

    write_plots(portfolio, test, cfg.seed, lay.plots)  # simplex map, gap vs size, value vectors
    say(f"coverage: portfolio of {len(members)} of {len(trained)} trained + {len(soups)} soups "
        f"({int((~oracle[members]).sum())} soups in it), "
        f"{'CERTIFIED' if cert.certified else 'NOT certified'} at eps={c.eps}, delta={c.delta} "
        f"(max eps {cert.max_eps:.4f}, max delta {cert.max_delta:.4f}, relative to the oracle)")
    if check.n_beaten:
        say(f"coverage: warning: {check.n_beaten} of {len(trained)} trained policies are beaten at their "
            f"own weight by another candidate (worst by {check.shortfall.max():.4f}): the alignment "
            f"oracle assumption behind the certificate does not hold there (portfolio.json oracle_check)")
    return metrics


# ----------------------------------------------------------------------------------- register


def register_stage(cfg: PalmConfig, root: Path) -> dict:
    """Register the portfolio's members and the portfolio in the MLflow model registry."""
    from palm_tasks.registry import register_portfolio

    result = register_portfolio(cfg, root)
    _write_json(Layout(root).metrics / "register.json", result)
    say(f"register: portfolio {result['portfolio_id']} is version {result['portfolio_version']} "
        f"(alias {result['alias']}), {result['created']} new registry entries")
    if result.get("warning"):
        say(f"register: [yellow]{result['warning']}[/]")
    return result


STAGE_FUNCTIONS = {
    "rewards": rewards_stage,
    "grid": grid_stage,
    "align": align_stage,
    "soups": soups_stage,
    "coverage": coverage_stage,
    "register": register_stage,
}
