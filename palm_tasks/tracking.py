"""MLflow set-up shared by every stage: one SQLite store and one artifact root per project.

The tracking URI in params.yaml is relative to the project directory (`sqlite:///mlruns/...`),
so it is resolved against the project root here; artifacts go to `mlruns/artifacts`.
"""

from __future__ import annotations

from pathlib import Path

from palm_tasks.config import PalmConfig


def tracking_uri(cfg: PalmConfig, root: Path, create: bool = True) -> str:
    """The tracking URI with a relative SQLite path made absolute under `root`.

    ConfigError if a local store would lie outside the project; `create` makes its directory.
    """
    # Not MLFLOW_TRACKING_URI: mlflow.set_tracking_uri sets it, so a second project in the
    # same process would silently reuse the first one's store.
    uri = cfg.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        db = inside_project(root, uri[len(prefix):], "mlflow.tracking_uri")
        if create:
            db.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(db)
    if "://" not in uri or uri.startswith("file:"):
        # A file store path: the same rule as SQLite, nothing is written outside the project.
        inside_project(root, uri.removeprefix("file://").removeprefix("file:"), "mlflow.tracking_uri")
    return uri


def inside_project(root: Path, path: str | Path, key: str) -> Path:
    """`path` (relative to root, or absolute) resolved; ConfigError if it leaves the project.

    Paths taken from params.yaml or from requests go through here before anything is written,
    so that `../..` or an absolute path cannot make the pipeline write outside its directory.
    """
    from palm_tasks.config import ConfigError

    root = Path(root).resolve()
    resolved = (root / path).resolve()  # an absolute `path` replaces root; symlinks resolved
    if resolved != root and root not in resolved.parents:
        raise ConfigError(f"{key} = {str(path)!r}: resolves to {resolved}, outside the project "
                          f"directory {root}; use a path inside it (e.g. mlruns/mlflow.db)")
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
    return f"mlflow ui --backend-store-uri {tracking_uri(cfg, root)} --host 127.0.0.1 --port 5000"
