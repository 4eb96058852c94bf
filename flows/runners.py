"""The Prefect task runner that runs jobs (train, soup, evaluate), chosen by params.yaml `runner`.

    threads   Prefect's ThreadPoolTaskRunner in the flow's process (default)
    dask      prefect-dask's DaskTaskRunner: a local cluster of `workers` processes, or `address`
    ray       prefect-ray's RayTaskRunner: a local Ray instance, or `address` (pip install '.[ray]')

One job per GPU: a GRPO job holds a whole GPU. When jobs run on CUDA, threads run one at a
time (they share this process's GPU); a local Dask cluster starts one worker per visible GPU,
pinned to it with CUDA_VISIBLE_DEVICES and holding one `GPU` resource that every job asks for;
a remote Dask cluster must have been started with `--resources GPU=1` per GPU worker; Ray jobs
ask for `num_gpus=1` and Ray pins the device itself.

Workers of a cluster import `flows` and `palm_tasks`, and read and write the project directory
by the same absolute path: a remote cluster needs the project installed and on a shared disk,
and PREFECT_API_URL set to a Prefect server that both sides reach. Local workers report to the
flow's own server.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from palm_tasks.config import PalmConfig

# Dask logs every worker start and stop at INFO; read before distributed is first imported, here
# and (inherited) in worker processes.
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def jobs_use_gpu(cfg: PalmConfig) -> bool:
    """Whether jobs will train on CUDA (device: cuda, or auto with a GPU visible here)."""
    if cfg.device != "auto":
        return cfg.device == "cuda"
    import torch

    return torch.cuda.is_available()


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _cores_per_job(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def local_cluster(n_workers: int, gpus: list[str] | None = None, prefect_api_url: str | None = None):
    """A Dask cluster on this machine: single-threaded worker processes, one per job slot.

    With `gpus`, one worker per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES) and holding
    the resource GPU=1. Each worker's torch gets an equal share of the cores (Dask's default of
    one OpenMP thread per worker would make CPU training crawl). No memory limit: Dask would
    pause or restart a worker over a training job's memory, and a restart loses the job.
    """
    from distributed import Nanny, Scheduler, SpecCluster

    if gpus:
        n_workers = len(gpus)
    cores = str(_cores_per_job(n_workers))
    workers = {}
    for i in range(n_workers):
        env = {"OMP_NUM_THREADS": cores, "MKL_NUM_THREADS": cores, "OPENBLAS_NUM_THREADS": cores}
        if prefect_api_url:
            env["PREFECT_API_URL"] = prefect_api_url
        options = {"nthreads": 1, "host": "127.0.0.1", "memory_limit": 0, "env": env}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
            options["resources"] = {"GPU": 1}
        workers[f"palm-align-{i}"] = {"cls": Nanny, "options": options}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="palm-align")


def task_runner(cfg: PalmConfig):
    """A fresh, unstarted Prefect task runner for a flow's jobs (flows/jobs.py)."""
    r, gpu = cfg.runner, jobs_use_gpu(cfg)
    if r.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1 if gpu else r.workers)
    if r.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if r.address:
            return DaskTaskRunner(address=r.address)
        gpus = visible_gpus()[: r.workers] if gpu else None
        return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={
            "n_workers": r.workers, "gpus": gpus, "prefect_api_url": _prefect_api_url()})
    from prefect_ray import RayTaskRunner  # installed: palm_tasks.config checks for kind ray

    if r.address:
        return RayTaskRunner(address=r.address)
    return RayTaskRunner(init_kwargs={"runtime_env": {"env_vars": {"PREFECT_API_URL": _prefect_api_url()}}})


def _prefect_api_url() -> str:
    """The flow's Prefect server, temporary or not: local workers report to it (without it each
    worker process would start a temporary server of its own)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


@contextmanager
def job_resources(cfg: PalmConfig):
    """What each job asks its scheduler for, around `submit`: a GPU on CUDA (one job per GPU);
    on a local Ray instance also a share of the cores, so that `workers` jobs run at once."""
    r, gpu = cfg.runner, jobs_use_gpu(cfg)
    if r.kind == "dask" and gpu:
        import dask

        with dask.annotate(resources={"GPU": 1}):
            yield
    elif r.kind == "ray":
        from prefect_ray.context import remote_options

        options = {"num_gpus": 1} if gpu else {}
        if r.address is None:
            options["num_cpus"] = _cores_per_job(r.workers)
        with remote_options(**options):
            yield
    else:
        yield


# --- the temporary Prefect server ------------------------------------------------------------

# Without PREFECT_API_URL, the first flow of a `palm` command starts a temporary Prefect server
# (uvicorn, about 224 MB) as a child process, and Prefect stops it at exit (atexit). A SIGKILL
# of palm, or the OOM killer, runs no atexit: the server would go on, adopted by init. So the
# server runs under this watchdog, which stops it once the process that started it is gone,
# whatever thread started it (prctl's PR_SET_PDEATHSIG fires when the starting *thread* exits,
# and Prefect may start the server from a worker thread that ends long before palm does).
_SERVER_WATCHDOG = """\
import os, runpy, signal, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:  # once the parent dies, the child is re-parented
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own shutdown closes the database cleanly
    time.sleep(10)
    os._exit(1)
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[2:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


class _SubprocessWithWatchdog:
    """The `subprocess` module as prefect.server.api.server sees it: Popen of `python -m uvicorn`
    runs uvicorn under _SERVER_WATCHDOG, tied to this process; everything else is unchanged."""

    def __getattr__(self, name):
        import subprocess

        return getattr(subprocess, name)

    @staticmethod
    def Popen(args, *rest, **kwargs):  # noqa: N802 (subprocess's name)
        import subprocess
        import sys

        if list(args[:3]) == [sys.executable, "-m", "uvicorn"]:
            args = [sys.executable, "-c", _SERVER_WATCHDOG, str(os.getpid()), *args[3:]]
        return subprocess.Popen(args, *rest, **kwargs)


def tie_prefect_server_to_this_process() -> None:
    """Make the temporary Prefect server that flows of this process start die with it
    (SIGKILL included). Idempotent; a server already running is left as it is."""
    from prefect.server.api import server

    if not isinstance(server.subprocess, _SubprocessWithWatchdog):
        server.subprocess = _SubprocessWithWatchdog()
