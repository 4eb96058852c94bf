"""Task runners: alignment jobs on a real local Dask cluster (prefect-dask), and how jobs ask
for GPUs."""

import importlib.util
import json
import os
import tempfile

import pytest

from conftest import copy_project

pytestmark = pytest.mark.slow


def test_two_jobs_on_a_local_dask_cluster_of_two_workers(prepared_project, tmp_path, prefect_harness):
    import mlflow

    from flows.stages import STAGE_FLOWS
    from palm_tasks.params_yaml import load_config
    from palm_tasks.jobs import load_policy
    from palm_tasks.schema import load_pool
    from palm_tasks.tracking import tracking_uri

    root = copy_project(prepared_project, tmp_path / "project",
                        search={"mode": "uniform", "k": 2, "max_trainings": 2},
                        runner={"kind": "dask", "workers": 2})
    result = STAGE_FLOWS["align"](str(root / "params.yaml"), str(root))
    assert result["jobs"] == result["trained"] == 2

    pool = load_pool(root)
    members = [load_policy(root / "models" / "members" / k) for k in pool.keys]
    workers = {(m.training["worker"]["host"], m.training["worker"]["pid"]) for m in members}
    assert len(workers) == 2, f"both jobs ran in one process: {workers}"
    assert os.getpid() not in {pid for _, pid in workers}, "jobs ran in the flow's process"
    for m in members:
        assert (m.adapter / "adapter_model.safetensors").is_file()

    # both worker processes wrote to the one SQLite MLflow store, without losing a run
    cfg = load_config(root / "params.yaml")
    client = mlflow.MlflowClient(tracking_uri(cfg, root))
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
                              "tags.`palm.stage` = 'align'")
    assert sorted(r.info.run_id for r in runs) == sorted(m.training["mlflow_run_id"] for m in members)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert json.loads((root / "metrics" / "align.json").read_text())["jobs"] == len(pool.keys) == 2


def test_a_local_gpu_cluster_pins_one_gpu_per_worker():
    """No GPU is needed to check the pinning: each worker sees one device and holds GPU=1."""
    from distributed import Client

    from flows.runners import local_cluster

    with local_cluster(n_workers=1, gpus=["2", "5"]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["2", "5"]
        resources = [w["resources"] for w in client.scheduler_info()["workers"].values()]
        assert resources == [{"GPU": 1}, {"GPU": 1}]
        # a job asking for a GPU lands on a worker holding one; two such jobs never share it: each
        # job holds its GPU (a file created exclusively, named after CUDA_VISIBLE_DEVICES) while it
        # runs, so a second job on the same GPU at the same time finds the file and says so
        import dask

        def _hold_the_gpu(held: str, i: int) -> dict:
            """A job on a Dask worker: it holds its GPU for 0.5 s (a file created with O_EXCL, removed
            after), and says whether another job held that GPU already."""
            import time

            gpu = os.environ["CUDA_VISIBLE_DEVICES"]
            try:
                fd = os.open(os.path.join(held, f"gpu-{gpu}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                time.sleep(0.5)
                return {"job": i, "gpu": gpu, "shared": True}
            time.sleep(0.5)
            os.close(fd)
            os.unlink(os.path.join(held, f"gpu-{gpu}"))
            return {"job": i, "gpu": gpu, "shared": False}

        with tempfile.TemporaryDirectory() as held:
            with dask.annotate(resources={"GPU": 1}):
                futures = [client.submit(_hold_the_gpu, held, i, pure=False) for i in range(6)]
            jobs = client.gather(futures)
        shared = [j for j in jobs if j["shared"]]
        assert shared == [], f"two jobs ran on one GPU at once: {shared}"
        assert {j["gpu"] for j in jobs} == {"2", "5"}  # both GPUs worked


def test_threads_run_one_job_at_a_time_on_cuda():
    from flows.runners import task_runner
    from palm_tasks.config import ConfigError, parse_config

    assert task_runner(parse_config({"device": "cpu", "runner": {"workers": 3}}))._max_workers == 3
    assert task_runner(parse_config({"device": "cuda", "runner": {"workers": 3}}))._max_workers == 1
    with pytest.raises(ConfigError, match="runner.address = 'tcp://h:8786' is for kind dask or ray"):
        parse_config({"runner": {"address": "tcp://h:8786"}})


@pytest.mark.skipif(importlib.util.find_spec("prefect_ray") is not None, reason="the ray extra is installed")
def test_ray_without_its_extra_says_how_to_install_it():
    from palm_tasks.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"pip install -e '\.\[ray\]'"):
        parse_config({"runner": {"kind": "ray"}})
