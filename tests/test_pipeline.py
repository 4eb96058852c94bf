"""The whole pipeline, integrated: real Prefect (test harness), real TRL + PEFT training on a
tiny model, real MLflow (SQLite in a temporary project), real DVC."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import copy_run, make_project

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("finished_run")]


def _member_files(root: Path) -> dict[str, float]:
    """Modification time of every finished member's adapter: changes only if retrained."""
    return {p.parent.parent.name: p.stat().st_mtime_ns
            for p in (root / "models" / "members").glob("*/adapter/adapter_model.safetensors")}


def palm(root: Path, *args: str) -> subprocess.CompletedProcess:
    """The palm command, as a user runs it, on a project."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--root", str(root),
                           "--params", str(root / "params.yaml")],
                          capture_output=True, text=True, timeout=600)


def test_a_stage_without_its_inputs_says_which_stage_to_run(tmp_path, tiny_model):
    root = make_project(tmp_path / "project", tiny_model)
    proc = palm(root, "stage", "coverage")
    assert proc.returncode == 1
    # Prefect logs the failed flow run; palm ends with one line that says what to do
    assert "palm: error: " in proc.stderr and "run `palm stage align` first" in proc.stderr


def test_the_first_command_writes_every_stage_and_each_agrees_with_the_next(finished_run):
    """`palm run` on the tiny project (the shared finished run): what each stage wrote, read back
    and checked against what the next stage made of it."""
    import mlflow

    from palm_tasks.jobs import load_policy
    from palm_tasks.params_yaml import load_config
    from palm_tasks.portfolio import load_portfolio
    from palm_tasks.schema import load_pool, load_soups
    from palm_tasks.stages.coverage import METRIC_KEYS
    from palm_tasks.tracking import tracking_uri

    root = finished_run
    params = str(root / "params.yaml")
    result = {name: json.loads((root / "metrics" / f"{name}.details.json").read_text())
              if (root / "metrics" / f"{name}.details.json").is_file()
              else json.loads((root / "metrics" / f"{name}.json").read_text())
              for name in ("rewards", "grid", "align", "soups", "coverage", "register")}

    # rewards: the prompt split, the humor classifier's accuracy, the trade-off matrix
    rewards = json.loads((root / "metrics" / "rewards.json").read_text())
    assert rewards["humor_classifier_accuracy"] > 0.7
    details = json.loads((root / "metrics" / "rewards.details.json").read_text())  # text and lists
    assert details["reward_models"]["humor"]["heldout_accuracy"] == rewards["humor_classifier_accuracy"]
    corr = np.array(details["correlation"]["matrix"])
    assert corr.shape == (3, 3) and np.allclose(np.diag(corr), 1)

    # grid: never larger than its proven bound
    grid = json.loads((root / "data" / "grid.json").read_text())
    assert 0 < grid["size"] <= grid["bound"]

    # align: every pooled policy is on disk with its adapter and a value vector in [0, 1]
    pool = load_pool(root)
    cfg = load_config(params)
    assert result["align"]["trained"] == pool.trained == len(pool.keys) >= 3
    members = {p.key: p for p in pool.policies}
    for m in members.values():
        stored = load_policy(m.path)  # the job's own record, measured on its first prompts
        assert (stored.key, stored.weights) == (m.key, m.weights)
        assert m.scores.prompts >= cfg.evaluation.first_prompts  # more where a decision needed them
        if m.scores.prompts == stored.value.n // cfg.evaluation.samples_per_prompt:
            assert stored.value == m.value
        assert (m.adapter / "adapter_model.safetensors").is_file()
        assert not list(m.path.rglob("*.bin")), "no pickled files in a member"
        assert np.all((m.values >= 0) & (m.values <= 1)) and np.all(m.std_errors >= 0)
        assert np.isclose(m.w.sum(), 1)
    # the lazy search starts from the d single-trait optima
    assert sorted(tuple(np.round(p.weights, 6)) for p in pool.policies[:3]) == sorted(map(tuple, np.eye(3)))

    # coverage: the portfolio is a subset of the pool and agrees with the members' files
    portfolio = load_portfolio(root)
    assert list(portfolio.pool) == pool.keys
    soups = load_soups(root)  # free candidates beside the trained pool
    assert portfolio.soups["candidates"] == soups.keys
    assert len(soups.keys) == json.loads((root / "metrics" / "soups.json").read_text())["built"] == 3
    members.update({p.key: p for p in soups.policies})
    assert 1 <= len(portfolio.members) <= len(pool.keys) + len(soups.keys)
    for entry in portfolio.members:
        m = members[entry.key]
        assert np.allclose(entry.value.mean, m.values, atol=1e-6)
        assert np.allclose(entry.weights, m.weights, atol=1e-6)
        assert (root / entry.path).resolve() == m.path.resolve()
    assert sum(e.share for e in portfolio.members) == pytest.approx(1)
    assert portfolio.certificate.relative_to and len(portfolio.certificate.worst_weight) == 3
    assert portfolio.base_model_sha256 == json.loads((root / "models" / "base" / "base.json").read_text())[
        "weights_sha256"]
    coverage = result["coverage"]  # metrics/coverage.json: the numbers dvc metrics shows
    assert set(coverage) == set(METRIC_KEYS)
    assert coverage["portfolio_size"] == len(portfolio.members)
    # the certificate states its confidence and how alpha was split over its decisions
    cert = portfolio.certificate
    assert cert.alpha == coverage["alpha"] == cfg.coverage.alpha
    assert cert.statement.endswith(f"covering with confidence 1 - alpha = {1 - cfg.coverage.alpha:g}, "
                                   "relative to the oracle and the evidence")
    assert cert.split["decisions"] == cert.decisions == coverage["decisions"] > 0
    assert cert.split["each"] == pytest.approx(cfg.coverage.alpha / cert.decisions)
    assert len(cert.open_at_cap) == coverage["open_at_cap"]
    # every answer measured is counted, as the chunk files on disk hold them: every trained
    # policy's (a row a repair replaced included) and the soups'
    chunks = list(root.glob("models/*/*/evaluations/*/chunk-*.json"))
    assert chunks and coverage["answers_evaluated"] == sum(len(json.loads(c.read_text())["rewards"]) for c in chunks)
    assert coverage["answers_evaluated"] >= sum(p.scores.prompts for p in [*pool.policies, *soups.policies]) * \
        cfg.evaluation.samples_per_prompt
    # the alignment-oracle check: every trained row at its own weight, a paired decision each
    everyone = np.array([m.values for m in members.values()])
    assert portfolio.oracle_check["checked"] == len(pool.keys) == len(portfolio.oracle_check["rows"])
    assert coverage["oracle_rows_beaten"] == portfolio.oracle_check["beaten"]
    assert portfolio.oracle_check["split"]["decisions"] == len(pool.keys)
    # the price of precision: the eps certified by the best k, and after each of the search's trainings
    price = portfolio.price
    assert [r["k"] for r in price["by_size"]] == list(range(1, len(price["by_size"]) + 1))
    assert [r["trainings"] for r in price["by_compute"]] == list(range(1, result["align"]["trainings"] + 1))
    assert all(a["answers"] <= b["answers"] for a, b in zip(price["by_compute"], price["by_compute"][1:]))
    assert json.loads((root / "plots" / "price_vs_size.json").read_text()) == price["by_size"]
    assert (root / "plots" / "price_of_precision.png").read_bytes()[:4] == b"\x89PNG"

    # register: one registered version per member, tagged with weights and values; the alias
    # is production for a certified portfolio, candidate otherwise
    client = mlflow.MlflowClient(tracking_uri(cfg, root), registry_uri=tracking_uri(cfg, root))
    member_model = f"{cfg.mlflow.registered_model_prefix}-{cfg.task}-member"
    versions = client.search_model_versions(f"name = '{member_model}'")
    by_key = {v.tags["member_key"]: v for v in versions}
    assert set(by_key) == {e.key for e in portfolio.members}
    for entry in portfolio.members:
        tags = by_key[entry.key].tags
        for trait, w, v in zip(portfolio.traits, entry.weights, entry.value.mean):
            assert float(tags[f"w.{trait}"]) == pytest.approx(w, abs=1e-4)  # tags show 4 decimals
            assert float(tags[f"value.{trait}"]) == pytest.approx(v, abs=1e-4)
        assert tags["portfolio_id"] == portfolio.id
    portfolio_model = f"{cfg.mlflow.registered_model_prefix}-{cfg.task}-portfolio"
    # production only for a portfolio certified, every member through the gate, the evidence not
    # contradicting it (docs/quality-gate.md): read from the file, not from blockers()
    written = json.loads((root / "portfolio.json").read_text())
    promotable = (written["certificate"]["certified"] is True and not written["evidence"].get("contradicted")
                  and all(g["passed"] is True for g in written["gate"]["members"].values()))
    alias = "production" if promotable else "candidate"
    assert result["register"]["alias"] == alias
    assert bool(portfolio.blockers()) == (not promotable)
    registered = client.get_model_version_by_alias(portfolio_model, alias)
    assert registered.tags["portfolio_id"] == portfolio.id
    # the registry and the run summary say the evidence audit in the portfolio's one sentence
    assert portfolio.evidence_summary().startswith("Against the evidence (best-of-")
    assert portfolio.evidence_summary() in registered.description

    # the evidence audit: best-of-N of the base's sample pool and every measured policy, at every
    # test weight; recomputed here on the lattice (the audit also covers the test users) in plain
    # numpy from the pool's scores and the members' values, not with the code under test
    pool_file = json.loads((root / "data" / "samples" / "eval.json").read_text())
    scores = np.array(pool_file["scores"])  # (prompts, N answers, traits)
    allowed = np.array(pool_file["relevance"]) >= cfg.training.min_relevance  # on topic (all at 0)
    allowed |= ~allowed.any(axis=1, keepdims=True)  # a prompt with no answer on topic: all of them
    ev = portfolio.evidence
    assert ev["best_of_n"] == scores.shape[1] == cfg.evidence.best_of
    n = cfg.coverage.test_lattice
    lattice = np.array([(i, j, n - i - j) for i in range(n + 1) for j in range(n + 1 - i)]) / n
    # best-of-N at w: on each prompt the allowed answer with the highest w . r, averaged over prompts
    bon = np.where(allowed, np.einsum("pnd,md->mpn", scores, lattice), -np.inf).max(axis=2).mean(axis=1)
    E = np.maximum((lattice @ everyone.T).max(axis=1), bon)
    P = (lattice @ np.array([e.value.mean for e in portfolio.members]).T).max(axis=1)
    gaps = np.where(E > 0, 1 - P / np.where(E > 0, E, 1), 0.0)
    assert ev["worst_gap"] >= gaps.max() - 1e-5  # files hold 6 decimals
    assert ev["worst_against"].startswith(("best-of-2", "policy "))
    assert coverage["worst_evidence_gap"] == pytest.approx(ev["worst_gap"])
    eps_needed = np.maximum(1 - (P + cfg.coverage.delta) / E, 0).max()
    assert ev["evidence_eps"] >= eps_needed - 1e-5 and ev["evidence_eps"] <= ev["worst_gap"] + 1e-9
    assert coverage["evidence_eps"] == pytest.approx(ev["evidence_eps"])
    assert set(portfolio.gate["members"]) == {e.key for e in portfolio.members}

    # palm status shows the members and the portfolio
    status = palm(root, "status")
    assert status.returncode == 0
    shown = status.stdout
    assert portfolio.id in shown and all(k in shown for k in pool.keys)
    # the run summary says the same evidence sentence as the registry
    import contextlib
    import io

    from palm_tasks.report.console import print_summary

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        print_summary(cfg, root)
    assert "Against the evidence (best-of-" in " ".join(printed.getvalue().split())
    assert "with confidence 1 - alpha" in " ".join(printed.getvalue().split())


def test_the_run_says_what_each_training_cost_and_what_ended_its_rounds(finished_run, capsys, monkeypatch):
    # metrics/align.details.json: one row per training of the search (replaced repairs too), its
    # seconds by phase, read from the job's own records (rsft's rounds, each score chunk's time);
    # metrics/align.json: the phase totals; `palm run` prints them with each stage's seconds
    from palm_tasks.cost import totals
    from palm_tasks.report.console import print_cost
    from palm_tasks.params_yaml import load_config
    from palm_tasks.schema import load_pool, load_samples

    details = json.loads((finished_run / "metrics" / "align.details.json").read_text())
    steps = load_pool(finished_run).history["steps"]
    cfg = load_config(finished_run / "params.yaml")
    ev = cfg.evaluation
    rows = details["cost"]
    assert [r["key"] for r in rows] == [h["key"] for h in steps] and len(rows) == details["trainings"]
    for row in rows:
        assert row["rounds"] == row["of"] == 1 and row["ended"] == "the round cap"  # tiny params: 1 round
        assert row["seconds"]["sft"] > 0 and row["seconds"]["evaluation"] > 0 and row["prompts"] >= 4
        assert row["seconds"]["round_tests"] == 0  # one round: no test after it
        assert row["tokens"]["round_tests"] == 0
        answers = row["prompts"] * ev.samples_per_prompt
        assert answers <= row["tokens"]["evaluation"] <= answers * ev.max_new_tokens
    # tokens sampled in training: the first extreme's round imitates the pool (none sampled); a
    # warm-started job samples its own round, an answer of 1 to max_completion_length tokens each
    t, n_train = cfg.training, cfg.data.n_train
    assert rows[0]["tokens"]["sampling"] == 0 and len(rows) > 1
    for row in rows[1:]:
        assert n_train * t.samples_per_prompt <= row["tokens"]["sampling"] <= n_train * t.samples_per_prompt \
            * t.max_completion_length
    align = json.loads((finished_run / "metrics" / "align.json").read_text())
    assert align["seconds"] == totals(rows) and align["tokens"] == totals(rows, "tokens")
    assert align["tokens"]["evaluation"] == sum(r["tokens"]["evaluation"] for r in rows)
    rewards = json.loads((finished_run / "metrics" / "rewards.json").read_text())
    pool = load_samples(finished_run)
    assert len(pool.prompts) * pool.n <= rewards["tokens_generated"]  # at least the eval pool's first tokens
    monkeypatch.setenv("COLUMNS", "300")
    print_cost(finished_run, {"rewards": 12.0, "align": 34.0, "coverage": 1.0})
    out = capsys.readouterr().out
    assert "rewards (12 s)" in out and "align (34 s)" in out and "coverage (1 s)" in out
    assert all(row["key"] in out for row in rows) and "the search stopped" in out and "tokens generated" in out


def test_a_second_run_trains_nothing_and_another_search_mode_reuses_every_shared_job(finished_run, tmp_path,
                                                                                      prefect_harness):
    import mlflow

    from flows.pipeline import pipeline
    from palm_tasks.params_yaml import load_config
    from palm_tasks.schema import load_pool
    from palm_tasks.tracking import tracking_uri

    root = copy_run(finished_run, tmp_path / "project")
    params = str(root / "params.yaml")
    cfg = load_config(params)
    client = mlflow.MlflowClient(tracking_uri(cfg, root), registry_uri=tracking_uri(cfg, root))
    member_model = f"{cfg.mlflow.registered_model_prefix}-{cfg.task}-member"
    before = _member_files(root)
    n_versions = len(client.search_model_versions(f"name = '{member_model}'"))
    again = pipeline(params, str(root))  # the stage flows in this process, through Prefect
    assert set(again) == {"rewards", "grid", "align", "soups", "coverage", "register", "seconds"}
    assert set(again["seconds"]) == {"rewards", "grid", "align", "soups", "coverage", "register", "dvc commit"}
    assert _member_files(root) == before
    assert again["align"]["trained"] == 0 and again["register"]["created"] == 0
    assert len(client.search_model_versions(f"name = '{member_model}'")) == n_versions

    # another search mode reuses every job it shares with the first (the job cache)
    changed = yaml.safe_load((root / "params.yaml").read_text())
    changed["search"]["mode"] = "coarse"
    (root / "params.yaml").write_text(yaml.safe_dump(changed))
    coarse = pipeline(params, str(root))["align"]
    shared = set(load_pool(root).keys) & set(before)
    # (the lazy run's first extreme at least: its later weights start from the rows before them)
    assert len(shared) >= 1 and coarse["reused"] == len(shared)
    assert coarse["trained"] == coarse["jobs"] - len(shared)
    assert all(_member_files(root)[k] == before[k] for k in shared)


def test_the_gate_measures_garbled_answers_and_refuses_a_policy_that_gives_many(finished_run):
    # every measured policy carries its garbled share, computed from its stored answers; a policy
    # over gate.max_garbled_share is refused with a reason naming it, whatever its other figures
    import dataclasses

    from palm_tasks import schema
    from palm_tasks.gate import quality_gate
    from palm_tasks.llm.validity import garbled
    from palm_tasks.params_yaml import load_config

    cfg = load_config(finished_run / "params.yaml")
    pool = list(schema.load_pool(finished_run).policies)
    samples = schema.load_samples(finished_run)
    first = pool[0]
    chunks = sorted((first.path / "evaluations").glob("*/chunk-*.json"))
    answers = [a for f in chunks for a in json.loads(f.read_text())["completions"]]
    assert first.quality["garbled_share"] == pytest.approx(garbled(answers[:first.quality["answers"]]).mean())
    assert "garbled_share" in samples.quality
    strict = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={
        "max_degenerate_share": 1.0, "min_relevance_ratio": 0.0, "max_garbled_share": 0.15})})
    noisy = dataclasses.replace(first, quality={**first.quality, "garbled_share": 0.5})
    clean = dataclasses.replace(first, key="clean", quality={**first.quality, "garbled_share": 0.1})
    gate = quality_gate(strict, [noisy, clean], samples)["members"]
    assert not gate[noisy.key]["passed"] and gate[noisy.key]["reasons"] == ["50.0% garbled answers > 15.0%"]
    assert gate["clean"]["passed"]
