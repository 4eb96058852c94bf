"""MLflow set-up shared by every stage: one SQLite store and one artifact root per project.

The tracking URI in params.yaml is relative to the project directory (`sqlite:///mlruns/...`),
so it is resolved against the project root here; artifacts go to `mlruns/artifacts`.
"""

from __future__ import annotations

from pathlib import Path

from palm_tasks.config import PalmConfig


def tracking_uri(cfg: PalmConfig, root: Path) -> str:
    """The tracking URI with a relative SQLite path made absolute under `root`."""
    # Not MLFLOW_TRACKING_URI: mlflow.set_tracking_uri sets it, so a second project in the
    # same process would silently reuse the first one's store.
    uri = cfg.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        db = (Path(root) / uri[len(prefix):]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(db)
    return uri


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
