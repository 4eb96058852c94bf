"""A registry that travels: a copied project reads and writes only its own MLflow store, and its
registered models (the base included) load from that store alone. Real MLflow stores made by the
real register stage; the copy is a plain directory copy, as a user's `cp -r` or a restored backup.
(A `git clone` + `dvc pull` gets a store of its own: tests/test_dvc_remote.py.)"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import yaml

from palm_tasks.tracking import LOCATION_COLUMNS, relocate_store


def _files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _locations(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [row[0] for table, column in LOCATION_COLUMNS
                for row in con.execute(f"SELECT {column} FROM {table}") if row[0]]
    finally:
        con.close()


def _local(location: str) -> bool:
    return location.startswith(("file:", "/"))


def test_a_copied_project_writes_only_into_its_own_store_and_loads_from_it(registered, tmp_path):
    import mlflow
    import pandas as pd

    from palm_tasks.params_yaml import load_config
    from palm_tasks.registry import load_member, member_model_name, portfolio_model_name
    from palm_tasks.stages import STAGES
    from palm_tasks.tracking import tracking_uri

    source, keys, _, _ = registered
    original = shutil.copytree(source, tmp_path / "original")
    cfg = load_config(original / "params.yaml")
    tracking_uri(cfg, original)  # opening it moves its (copied) locations home
    mine = (original / "mlruns").resolve()
    assert all(loc.startswith((mine.as_uri() + "/", str(mine) + "/")) for loc in
               _locations(original / "mlruns" / "mlflow.db") if _local(loc))
    before = _files(original / "mlruns")

    copy = shutil.copytree(original, tmp_path / "copy")
    # new registered models in the copy: the base, every member and the portfolio are logged again
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["mlflow"]["registered_model_prefix"] = "palmcopy"
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    copy_cfg = load_config(copy / "params.yaml")
    result = STAGES["register"].run(copy_cfg, copy)
    assert result["alias"] == "production"

    assert _files(original / "mlruns") == before, "the copy wrote into the original project"
    theirs = (copy / "mlruns").resolve()
    copy_locations = [loc for loc in _locations(copy / "mlruns" / "mlflow.db") if _local(loc)]
    assert copy_locations and all(loc.startswith((theirs.as_uri() + "/", str(theirs) + "/"))
                                  for loc in copy_locations)

    # the original gone, the copy's registry alone answers: its production portfolio (base from
    # its own base version) and a member version registered before the copy was made
    shutil.move(original, tmp_path / "moved-away")
    mlflow.set_tracking_uri(tracking_uri(copy_cfg, copy))
    mlflow.set_registry_uri(tracking_uri(copy_cfg, copy))
    pyfunc = mlflow.pyfunc.load_model(f"models:/{portfolio_model_name(copy_cfg)}@production")
    out = pyfunc.predict(pd.DataFrame([{"safety": 0.2, "humor": 0.7, "brevity": 0.1, "prompt": "Tell me a joke"}]),
                         params={"max_new_tokens": 4})
    assert out["member_key"][0] in keys and isinstance(out["answer"][0], str)
    # its answers are sampled as the members were measured, unless the caller says otherwise
    defaults = {p.name: p.default for p in pyfunc.metadata.get_params_schema().params}
    assert defaults["temperature"] == copy_cfg.evaluation.temperature > 0 and defaults["top_k"] == 50
    earlier = mlflow.MlflowClient().search_model_versions(f"name = '{member_model_name(cfg)}'")
    pipe = load_member(f"models:/{member_model_name(cfg)}/{earlier[0].version}")
    assert pipe("Tell me a joke", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("Tell me")


def test_relocation_moves_only_locations_under_another_mlruns(tmp_path):
    """What is moved: <X>/mlruns/... of a store copied from X, in every location column;
    what is not: a sibling directory that only starts like it, a remote artifact store."""
    import mlflow

    made = tmp_path / "made" / "project"
    db = made / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    ours = client.create_experiment("ours", artifact_location=(made / "mlruns" / "artifacts").as_uri())
    sibling = client.create_experiment("sibling", artifact_location=(made / "mlruns-old" / "a").as_uri())
    client.create_experiment("remote", artifact_location="s3://bucket/palm")
    run = client.create_run(ours)
    (tmp_path / "note.txt").write_text("x")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))

    moved_to = tmp_path / "elsewhere" / "project"
    shutil.copytree(made, moved_to)
    moves = relocate_store(moved_to / "mlruns" / "mlflow.db", moved_to)
    # MLflow's Default experiment lies under the mlruns/ of the directory the store was created from
    default = client.get_experiment("0").artifact_location.rsplit("/", 1)[0]
    assert moves == {(made / "mlruns").as_uri(): (moved_to / "mlruns").resolve().as_uri(),
                     default: str((moved_to / "mlruns").resolve())}
    assert relocate_store(moved_to / "mlruns" / "mlflow.db", moved_to) == {}  # once is enough
    moved = mlflow.MlflowClient(f"sqlite:///{moved_to / 'mlruns' / 'mlflow.db'}")
    assert moved.get_experiment(ours).artifact_location == (moved_to / "mlruns" / "artifacts").resolve().as_uri()
    assert moved.get_experiment(sibling).artifact_location == (made / "mlruns-old" / "a").as_uri()
    assert moved.get_experiment_by_name("remote").artifact_location == "s3://bucket/palm"
    assert moved.get_run(run.info.run_id).info.artifact_uri.startswith((moved_to / "mlruns").resolve().as_uri())
    assert [a.path for a in moved.list_artifacts(run.info.run_id)] == ["note.txt"]
    # the original store is untouched
    assert client.get_experiment(ours).artifact_location == (made / "mlruns" / "artifacts").as_uri()
