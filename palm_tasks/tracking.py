"""All of MLflow tracking: one SQLite store and one artifact root per project, lineage tags, and
the run of each alignment job (registry.py holds the registered models).

The tracking URI in params.yaml is relative to the project directory (`sqlite:///mlruns/...`),
so it is resolved against the project root here; artifacts go to `mlruns/artifacts`.

MLflow records every artifact location in the store as an absolute path. A copied project
(`cp -r`, a backup restored elsewhere) would then read and write its artifacts in the original
project's `mlruns/`. `relocate_store` makes the store's locations relative to the project in
effect: a location under another directory's `mlruns/` is moved to this project's `mlruns/`
when the store is opened (docs/tracking.md, "A registry that travels").
"""

from __future__ import annotations

import re
from pathlib import Path

from palm_tasks.config import PalmConfig


KEY = "mlflow.tracking_uri"
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def tracking_uri(cfg: PalmConfig, root: Path, create: bool = True) -> str:
    """The tracking URI with a relative SQLite path made absolute under `root`.

    ConfigError if a local store would lie outside the project, or if its SQLite file exists but
    is not an SQLite database; `create` makes its directory. Paths are checked as MLflow and
    SQLAlchemy will read them: percent-decoded (`%2e%2e` is `..`).
    """
    from urllib.parse import quote, unquote, urlsplit

    from palm_tasks.config import ConfigError

    # Not MLFLOW_TRACKING_URI: mlflow.set_tracking_uri sets it, so a second project in the
    # same process would silently reuse the first one's store.
    uri = cfg.mlflow.tracking_uri
    shown = _short(uri)
    if uri != uri.strip() or not uri.isprintable():
        raise ConfigError(f"{KEY} = {shown}: has spaces or control characters around or in it; "
                          "write the URI alone (e.g. sqlite:///mlruns/mlflow.db)")
    scheme_match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    scheme = scheme_match.group(1) if scheme_match else ""
    if scheme != scheme.lower():
        raise ConfigError(f"{KEY} = {shown}: write the scheme {scheme!r} in lower case")
    if scheme.split("+")[0] == "sqlite":
        prefix = "sqlite:///"
        if scheme != "sqlite" or not uri.startswith(prefix):
            raise ConfigError(f"{KEY} = {shown}: a local store is written sqlite:///PATH (no host, no "
                              "driver), PATH relative to the project or absolute inside it")
        path, sep, query = uri[len(prefix):].partition("?")  # as SQLAlchemy splits it
        db = inside_project(root, unquote(path), KEY, shown=uri)
        _check_sqlite_file(db)
        if create:
            db.parent.mkdir(parents=True, exist_ok=True)
            relocate_store(db, root)
        return prefix + quote(str(db)) + sep + query
    if scheme in ("", "file"):
        # A file store path: the same rule as SQLite, nothing is written outside the project.
        parts = urlsplit(uri)
        if scheme == "file" and parts.netloc not in ("", "localhost"):
            raise ConfigError(f"{KEY} = {shown}: a file store on host {parts.netloc!r} is not local; "
                              "use a path inside the project")
        path = parts.path if scheme == "file" else uri
        for candidate in {path, unquote(path)}:  # MLflow decodes file paths (url2pathname)
            inside_project(root, candidate, KEY, shown=uri)
    return uri


# Where MLflow keeps artifact locations: (table, column). Experiments hand theirs down to their
# runs and logged models; a model version's source and storage location point into those.
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                    ("model_versions", "source"))
MLRUNS = "mlruns"


def relocate_store(db: Path, root: Path) -> dict[str, str]:
    """Move the store's artifact locations that lie in another directory's `mlruns/` to this
    project's `mlruns/`; returns {old prefix: new prefix} of what was moved (empty: nothing).

    The store of a copied project still names the original's directory in every location (MLflow
    writes them absolute), so without this a run logged in the copy would write its artifacts
    into the original project, and the copy's models would load the original's files. The rule
    keeps locations relative to the project: `<X>/mlruns/<rest>` becomes `<root>/mlruns/<rest>`
    for every X that is not this project, in one transaction. Locations outside any `mlruns/`
    (a configured remote artifact store) are left alone. A store opened read-only is left as it
    is (it cannot be written, so nothing is written into the other project either).
    """
    import sqlite3
    from urllib.parse import unquote, urlsplit

    if not db.is_file():
        return {}
    here = (Path(root).resolve() / MLRUNS)
    try:
        con = sqlite3.connect(f"file:{quote_uri_path(db)}?mode=rw", uri=True, timeout=30,
                              isolation_level=None)
    except sqlite3.Error:
        return {}
    try:
        try:
            locations = [row[0] for row in con.execute("SELECT artifact_location FROM experiments")]
        except sqlite3.DatabaseError:  # a store MLflow has not created its tables in yet
            return {}
        moves = {}
        for location in locations:
            if not isinstance(location, str):
                continue
            is_uri = location.startswith("file:")
            if not (is_uri or location.startswith("/")):
                continue  # a remote store (s3://, mlflow-artifacts:/ ...): not a path of ours
            cut = location.rfind("/" + MLRUNS + "/")
            end = cut + len(MLRUNS) + 1 if cut >= 0 else (
                len(location) if location.endswith("/" + MLRUNS) else -1)
            if end < 0:
                continue
            old = location[:end]
            old_dir = Path(unquote(urlsplit(old).path) if is_uri else old)
            if old_dir == here:
                continue
            moves[old] = here.as_uri() if is_uri else str(here)
        if not moves:
            return {}
        con.execute("BEGIN IMMEDIATE")
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for old, new in moves.items():
            for table, column in LOCATION_COLUMNS:
                if table in tables:
                    # old itself, or old followed by '/': never a sibling such as mlruns-old/
                    con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                                (new, len(old) + 1, old, len(old) + 1, old + "/"))
        con.execute("COMMIT")
        return moves
    except sqlite3.DatabaseError as exc:
        if con.in_transaction:
            con.execute("ROLLBACK")
        if "readonly" in str(exc) or getattr(exc, "sqlite_errorname", "").startswith("SQLITE_READONLY"):
            return {}
        if "locked" in str(exc):
            return {}  # a writer holds it: the next open moves them
        raise
    finally:
        con.close()


def _check_sqlite_file(db: Path) -> None:
    """ConfigError unless `db` is missing (MLflow creates it) or an SQLite database: an empty or
    foreign file would be taken for an empty store and the run history silently replaced."""
    from palm_tasks.config import ConfigError

    if not db.exists():
        return
    fix = (f"palm will not replace it (that would lose the MLflow runs and registry); restore it from "
           f"a backup or move it away, then rerun ({KEY})")
    if not db.is_file():
        raise ConfigError(f"{db}: not a file, so not the SQLite database of the MLflow store; {fix}")
    try:
        with open(db, "rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise ConfigError(f"{db}: cannot be read ({exc.strerror or exc}); {KEY}") from None
    if not header:
        raise ConfigError(f"{db}: empty file, not an SQLite database of the MLflow store; {fix}")
    if header != SQLITE_HEADER:
        raise ConfigError(f"{db}: not an SQLite database (wrong header); {fix}")
    problem = _sqlite_damage(db)
    if problem:
        raise ConfigError(f"{db}: a damaged SQLite database ({problem}); {fix}")


def _sqlite_damage(db: Path) -> str | None:
    """What SQLite's quick_check finds wrong with `db` (truncated, pages overwritten), or None.
    Read-only (mode=ro): checking writes nothing, not even a journal."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{quote_uri_path(db)}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        return str(exc)[:200]
    try:
        rows = con.execute("PRAGMA quick_check(1)").fetchall()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            return None  # a writer holds it now: busy, not damaged
        return str(exc)[:200]
    except sqlite3.DatabaseError as exc:  # "database disk image is malformed", "file is not a database"
        return str(exc)[:200]
    finally:
        con.close()
    verdict = str(rows[0][0]) if rows else "no answer"
    # quick_check may answer on several lines ("*** in database main ***\nPage 127: ..."); the
    # message that names it is one line.
    return None if verdict == "ok" else " ".join(verdict.split())[:200]


class StoreNotWritableError(RuntimeError):
    """The MLflow store's SQLite database (or its directory) cannot be written."""


def check_store_writable(cfg: PalmConfig, root: Path) -> None:
    """StoreNotWritableError, naming the file, unless a command that records runs or registers
    models can write the project's SQLite store. Checked before any work: MLflow would fail
    only at its first write, minutes in, with an SQLAlchemy traceback hundreds of lines long.

    The probe is a real write, rolled back: SQLite opens a read-only file without complaint, and
    permission bits say nothing when palm runs as root, while a read-only mount, a file or
    directory without write permission, or an immutable file all fail it. A store that is not
    local SQLite is not probed here.
    """
    import os
    import sqlite3
    from urllib.parse import unquote

    uri = tracking_uri(cfg, root, create=False)
    if not uri.startswith("sqlite:///"):
        return
    db = Path(unquote(uri[len("sqlite:///"):].partition("?")[0]))
    fix = f"make it writable (or point {KEY} elsewhere) and rerun; nothing finished is lost"
    if not db.exists():  # MLflow creates it: its nearest existing directory must be writable
        existing = next(p for p in db.parents if p.exists())
        if not os.access(existing, os.W_OK):
            raise StoreNotWritableError(f"{existing} is read-only: the MLflow store {db} cannot be "
                                        f"created there; {fix}")
        return
    try:
        con = sqlite3.connect(f"file:{quote_uri_path(db)}?mode=rw", uri=True, timeout=30,
                              isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreNotWritableError(f"{db}: the MLflow store cannot be opened for writing ({exc}); "
                                    f"{fix}") from None
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("CREATE TABLE palm_write_probe (x)")  # needs the file and a journal beside it
        con.execute("ROLLBACK")
    except sqlite3.DatabaseError as exc:  # OperationalError among them
        name = getattr(exc, "sqlite_errorname", "")
        if name == "SQLITE_READONLY_DIRECTORY":
            raise StoreNotWritableError(f"{db.parent} is read-only, so the MLflow store {db} cannot be "
                                        f"written (SQLite keeps its journal beside it); {fix}") from None
        if name.startswith("SQLITE_READONLY") or "readonly" in str(exc):
            raise StoreNotWritableError(f"{db} is read-only: the MLflow store cannot be written "
                                        f"({exc}); {fix}") from None
        if name.startswith("SQLITE_BUSY") or "locked" in str(exc):
            return  # another process writes it now: that is no read-only store; MLflow waits its turn
        raise StoreNotWritableError(f"{db}: the MLflow store cannot be written ({exc}); {fix}") from None
    finally:
        con.close()


def quote_uri_path(path: Path) -> str:
    """`path` for an SQLite `file:` URI: '?' and '#' in a file name must not end the path."""
    from urllib.parse import quote

    return quote(str(path), safe="/")


def _short(text: str, limit: int = 120) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def inside_project(root: Path, path: str | Path, key: str, shown: str | None = None) -> Path:
    """`path` (relative to root, or absolute) resolved; ConfigError if it leaves the project.

    Paths taken from params.yaml or from requests go through here before anything is written,
    so that `../..` or an absolute path cannot make the pipeline write outside its directory.
    `shown` is the value as the user wrote it (when `path` was decoded from it).
    """
    from palm_tasks.config import ConfigError

    root = Path(root).resolve()
    try:
        resolved = (root / path).resolve()  # an absolute `path` replaces root; symlinks resolved
    except (OSError, ValueError) as exc:  # a NUL byte, a symlink loop, a name too long
        raise ConfigError(f"{key} = {_short(shown if shown is not None else str(path))}: not a usable "
                          f"path ({exc})") from None
    if resolved != root and root not in resolved.parents:
        raise ConfigError(f"{key} = {_short(shown if shown is not None else str(path))}: resolves to "
                          f"{resolved}, outside the project directory {root}; use a path inside it "
                          "(e.g. mlruns/mlflow.db)")
    return resolved


def lineage_tags(path: Path) -> dict[str, str]:
    """`git_commit` and `dvc_lock_sha256` of the project holding `path`, for every MLflow run.

    The project is the nearest directory at or above `path` with a dvc.yaml; "none" where
    there is no git commit or no dvc.lock (a run outside git, before the first `dvc repro`).
    """
    import hashlib
    import subprocess

    start = Path(path).resolve()
    root = next((p for p in [start, *start.parents] if (p / "dvc.yaml").is_file()), start)
    try:
        proc = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        commit = proc.stdout.strip() if proc.returncode == 0 else "none"
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        commit = "none"
    lock = root / "dvc.lock"
    lock_sha = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none"
    return {"git_commit": commit or "none", "dvc_lock_sha256": lock_sha}


def setup_mlflow(cfg: PalmConfig, root: Path) -> str:
    """Point mlflow at the project's store and experiment; returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    mlflow.set_registry_uri(tracking_uri(cfg, root))
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        artifacts = (Path(root) / "mlruns" / "artifacts").resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        experiment_id = mlflow.create_experiment(
            cfg.mlflow.experiment, artifact_location=artifacts.as_uri()
        )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def ui_command(cfg: PalmConfig, root: Path) -> str:
    """The command that opens the MLflow UI on this project's store (loopback only)."""
    return f"mlflow ui --backend-store-uri {tracking_uri(cfg, root, create=False)} --host 127.0.0.1 --port 5000"


class JobRun:
    """The MLflow run of one alignment job: its parameters, its training curves, its value.

    Created before training starts; a run of the same job still RUNNING belongs to a pipeline
    that was killed mid-job (its process never closed it) and is closed as KILLED first.
    """

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, cfg: PalmConfig, root: Path, spec, device: str, store: Path) -> "JobRun":
        import mlflow

        experiment_id = setup_mlflow(cfg, root)
        client = mlflow.MlflowClient()
        key = spec.key
        for run in client.search_runs(
                [experiment_id], f"tags.`palm.member_key` = '{key}' and attributes.status = 'RUNNING'"):
            client.set_terminated(run.info.run_id, status="KILLED")
        run = client.create_run(experiment_id, run_name=f"align-{key[:10]}",
                                tags={"palm.stage": "align", "palm.member_key": key, **lineage_tags(store)})
        params = {f"w.{tr}": round(w, 6) for tr, w in zip(spec.traits, spec.weights)}
        params.update({f"training.{k}": v for k, v in spec.training.items()})
        params.update({f"evaluation.{k}": v for k, v in cfg.evaluation.model_dump().items()})
        params.update({"key": key, "seed": spec.seed, "init_from": spec.init_from, "attempt": spec.attempt,
                       "device": device, "precision": spec.precision,
                       "base_model_sha256": spec.base_model_sha256[:16], "data_sha256": spec.data_sha256[:16]})
        client.log_batch(run.info.run_id, params=[_param(k, v) for k, v in params.items()])
        return cls(client, run.info.run_id)

    def on_log(self, key: str):
        """on_log(step, max_steps, logs) for the trainer: a line per step, the curves to MLflow."""
        import math

        from palm_tasks.log import say

        def log(step: int, max_steps: int, logs: dict) -> None:
            if "round" in logs:  # rsft: one log per round
                figures = ", ".join(f"{k} {v:.3f}" for k, v in logs.items()
                                    if k != "round" and isinstance(v, float))
                say(f"  {key} round {step}/{max_steps}: {figures}")
            elif "reward" in logs:
                say(f"  {key} step {step}/{max_steps} reward {float(logs['reward']):.3f}")
            metrics = [_metric(k.replace("/", "."), float(v), step) for k, v in logs.items()
                       if isinstance(v, (int, float)) and math.isfinite(v)]
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics)

        return log

    def finish(self, policy, steps: int) -> None:
        metrics = {f"value.{t}": v for t, v in zip(policy.traits, policy.value.mean)}
        metrics.update({f"se.{t}": s for t, s in zip(policy.traits, policy.value.se)})
        metrics.update({k: policy.training[k] for k in ("train_seconds", "total_seconds")})
        metrics.update({f"quality.{k}": v for k, v in policy.quality.items() if isinstance(v, (int, float))})
        if policy.scores is not None:  # the prompts it was first measured on (more where a decision needs them)
            metrics["evaluated_prompts"] = policy.scores.prompts
        self.client.log_batch(self.run_id, metrics=[_metric(k, float(v), steps) for k, v in metrics.items()])
        self.client.log_artifact(self.run_id, str(policy.path / "member.json"))
        self.client.set_terminated(self.run_id)

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, status="FAILED")


def _metric(key, value, step):
    import time

    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), step)


def _param(key, value):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


def log_rewards_run(cfg: PalmConfig, root: Path, metrics: dict, figure, samples: dict) -> None:
    """The rewards stage's run: the base model's reward distribution, correlations and samples."""
    import mlflow

    setup_mlflow(cfg, root)
    with mlflow.start_run(run_name="rewards", tags={"palm.stage": "rewards", **lineage_tags(root)}):
        mlflow.log_params({"base_model": cfg.base_model, "task": cfg.task,
                           "traits": ",".join(cfg.traits), "seed": cfg.seed,
                           "n_train": cfg.data.n_train, "n_eval": cfg.data.n_eval})
        flat = {f"{t}.{k}": v for t, d in metrics["distribution"].items() for k, v in d.items()}
        corr = metrics["correlation"]["matrix"]
        for i, a in enumerate(cfg.traits):
            for j, b in enumerate(cfg.traits):
                if i < j:
                    flat[f"corr.{a}.{b}"] = float(corr[i][j])
        flat["tokens_generated"] = metrics.get("tokens_generated", 0)  # the sample pool's, this run
        if "humor" in metrics["reward_models"]:
            flat["humor.heldout_accuracy"] = metrics["reward_models"]["humor"]["heldout_accuracy"]
        mlflow.log_metrics(flat)
        mlflow.log_dict(metrics, "rewards.json")
        mlflow.log_figure(figure, "reward_distributions.png")
        mlflow.log_table(samples, "base_samples.json")


def log_retrain_run(cfg: PalmConfig, root: Path, summary: dict) -> str:
    """The retraining run: reward drift, what was kept, added and dropped; retrain.json."""
    import mlflow

    setup_mlflow(cfg, root)
    tags = {"palm.stage": "retrain", "portfolio_id": summary["portfolio"], **lineage_tags(root)}
    with mlflow.start_run(run_name=f"retrain-{summary['portfolio'][:10]}", tags=tags) as run:
        mlflow.log_params({"previous_portfolio": summary["previous_portfolio"],
                           "data_split_seed": summary["data_split_seed"],
                           "eval_key": summary["eval_key"],
                           "base_model_changed": summary["base_model_changed"],
                           **{f"reward_version.{t}": v for t, v in summary["reward_versions"].items()}})
        mlflow.log_metrics({**{f"drift.{t}": v for t, v in summary["reward_drift"].items()},
                            "n_kept": len(summary["kept"]), "n_added": len(summary["added"]),
                            "n_dropped": len(summary["dropped"]), "n_trained": len(summary["trained"]),
                            "n_reevaluated": len(summary["reevaluated"]),
                            "certified": float(summary["certified"]),
                            "max_eps": float(summary["max_eps"])})
        mlflow.log_dict({k: v for k, v in summary.items() if k != "register"}, "retrain.json")
    return run.info.run_id


def log_evaluation_run(cfg: PalmConfig, root: Path, out: dict, files: list[Path]) -> None:
    """The evaluate stage's run: every figure of every method, the report and its plots."""
    import math

    import mlflow

    setup_mlflow(cfg, root)
    with mlflow.start_run(run_name=f"evaluate-{cfg.task}",
                          tags={"palm.stage": "evaluate", **lineage_tags(root)}):
        mlflow.log_params({"task": cfg.task, "traits": ",".join(cfg.traits),
                           **{f"compare.{k}": v for k, v in cfg.compare.model_dump().items()}})
        metrics = {f"{m}.k{k}.{n}": v for m, by_k in out["results"].items() for k, r in by_k.items()
                   for n, v in r.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        mlflow.log_metrics({**metrics, "reference_pool_size": out["reference_pool"]["size"],
                            "seconds": out["seconds"]})
        mlflow.log_dict(out, "evaluate.json")
        for f in files:
            mlflow.log_artifact(str(f), "report")
