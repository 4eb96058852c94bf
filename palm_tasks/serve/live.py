"""The portfolio being served, and how the server follows the registry (hot swap).

A `Deployment` is one portfolio version as served: its router, its registered version and the
name of each member's adapter in the model. `LivePortfolio.current` is the deployment that new
requests are routed with; a request reads it once, right before it is queued, and keeps it to
the end, so it is answered by the members it was routed to and says which version that was.

`reload()` asks the source (the registry alias, or a local portfolio.json) which version it
points at now. When that changed, the new portfolio's adapters are read and checked in the
calling thread, loaded into the model between two steps of the engine, and `current` then
moves to the new deployment in one assignment: requests in flight finish on the adapters they
started with, later ones are routed by the new portfolio, and none fails. Adapters only the
retired portfolio used are deleted once no answer in flight or queued uses them. A reload that
fails (the registry unreachable, a damaged adapter, another base model) leaves the current
portfolio serving and is reported by /health. `palm serve` calls `reload()` every
`serve.poll_interval_s` seconds and on `POST /v1/portfolio/reload`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from palm_tasks.serve.members import MemberModels, adapter_name
from palm_tasks.serve.router import Router

RETIRE_GRACE_S = 5.0  # a request reads `current` microseconds before it is queued: its adapters stay this long


@dataclass(frozen=True)
class Deployment:
    router: Router
    version: str  # the registered version, or the local portfolio.json's sha256 (first 12 hex digits)
    adapters: dict[str, str]  # member key -> adapter name in the model
    loaded_at: float = field(default_factory=time.time)

    @property
    def portfolio_id(self) -> str:
        return self.router.portfolio.id

    def describe(self) -> dict:
        return {"portfolio_id": self.portfolio_id, "portfolio_version": self.version,
                "members": list(self.adapters), "loaded_at": self.loaded_at}


class RegistrySource:
    """The portfolio registered as `model_name@alias` (project adapters looked for under root)."""

    def __init__(self, alias: str, tracking_uri: str, model_name: str, root: str | Path | None):
        self.alias, self.tracking_uri, self.model_name, self.root = alias, tracking_uri, model_name, root

    def version(self) -> str:
        import mlflow
        from mlflow import MlflowClient

        mlflow.set_registry_uri(self.tracking_uri)
        return str(MlflowClient(self.tracking_uri, self.tracking_uri)
                   .get_model_version_by_alias(self.model_name, self.alias).version)

    def load(self) -> tuple[Router, str]:
        router = Router.from_registry(self.alias, self.tracking_uri, self.model_name, root=self.root)
        return router, router.registered_version

    def describe(self) -> str:
        return f"{self.model_name}@{self.alias}"


class FileSource:
    """A local portfolio.json: a new version whenever its content changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def version(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]

    def load(self) -> tuple[Router, str]:
        version = self.version()
        return Router.from_portfolio(self.path), version

    def describe(self) -> str:
        return str(self.path)


def _adapters(router: Router) -> dict[str, tuple[str, Path]]:
    """member key -> (adapter name, directory), downloaded from the registry if need be."""
    out = {}
    for member in router.members:
        path = router.adapter_dir(member.key)
        out[member.key] = (adapter_name(member.key, path), path)
    return out


def _base_identity(router: Router) -> tuple:
    p = router.portfolio
    return (p.base_model_sha256, p.base_model_uri)


class LivePortfolio:
    """The deployment new requests are routed with, the model, and the engine that answers."""

    def __init__(self, source, engine_factory, device: str = "cpu"):
        """Load the source's portfolio; `engine_factory(models)` makes the engine (serve.engine)."""
        router, version = source.load()
        adapters = _adapters(router)
        self.source = source
        self.models = MemberModels(router.base_model_path(), {n: p for n, p in adapters.values()}, device)
        self.engine = engine_factory(self.models)
        self.current = Deployment(router, version, {k: n for k, (n, _) in adapters.items()})
        self._retired: list[tuple[float, Deployment]] = []
        self._reload_lock = threading.Lock()
        self.last_check: float | None = None
        self.last_error: str | None = None
        self.reloads = 0
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def reload(self) -> dict:
        """Serve the source's current version if it changed: {"changed", "previous", **current}.
        Raises (RuntimeError, LookupError, OSError, ValueError) when it cannot; the current
        portfolio goes on serving."""
        with self._reload_lock:
            self.last_check = time.time()
            try:
                out = self._reload()
                self.last_error = None
                return out
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                raise
            finally:
                self._collect()

    def _reload(self) -> dict:
        old = self.current
        version = self.source.version()
        if version == old.version:
            return {"changed": False, **old.describe()}
        router, version = self.source.load()
        if _base_identity(router) != _base_identity(old.router) and all(_base_identity(router)):
            raise RuntimeError(f"portfolio version {version} is on another base model ({router.portfolio.base_model_uri}) "
                               "than the one served: restart palm serve to serve it")
        adapters = _adapters(router)
        for name, path in adapters.values():  # checked here, not in the engine's thread
            MemberModels.verify(name, path)
        loading = {n: p for n, p in adapters.values()}
        self.engine.call_between_steps(lambda: self.models.load(loading, verify=False)).result()
        new = Deployment(router, version, {k: n for k, (n, _) in adapters.items()})
        self.current = new  # one assignment: every later request is routed by the new portfolio
        self._retired.append((time.monotonic(), old))
        self.reloads += 1
        return {"changed": True, "previous": old.describe(), **new.describe()}

    def _collect(self) -> None:
        """Delete the adapters of retired deployments that nothing uses any more (in the engine)."""
        now = time.monotonic()
        due = {id(d) for t, d in self._retired if now - t > RETIRE_GRACE_S}
        if not due:
            return

        def collect():
            names = {n for t, d in self._retired if id(d) in due for n in d.adapters.values()}
            keep = set(self.current.adapters.values()) | {n for t, d in self._retired if id(d) not in due
                                                          for n in d.adapters.values()}
            in_use = set(self.engine.in_use)
            self.models.delete(sorted(names - keep - in_use))
            self._retired = [(t, d) for t, d in self._retired
                             if id(d) not in due or set(d.adapters.values()) & in_use]

        self.engine.call_between_steps(collect).result()

    def poll(self, interval_s: float, say=print) -> None:
        """Check the source every interval_s seconds in a thread of its own (0: never)."""
        if interval_s <= 0:
            return

        def loop():
            while not self._stop.wait(interval_s):
                try:
                    out = self.reload()
                    if out["changed"]:
                        say(f"palm serve: now serving portfolio {out['portfolio_id'][:10]} (version "
                            f"{out['portfolio_version']}) from {self.source.describe()}")
                except Exception:  # noqa: BLE001 (kept in last_error, shown by /health)
                    say(f"palm serve: reload from {self.source.describe()} failed: {self.last_error}")

        self._poller = threading.Thread(target=loop, name="palm-registry-poll", daemon=True)
        self._poller.start()

    def health(self) -> dict:
        return {**self.current.describe(), "source": self.source.describe(), "reloads": self.reloads,
                "last_check": self.last_check, "last_reload_error": self.last_error}

    def close(self) -> None:
        self._stop.set()
        self.engine.close()
