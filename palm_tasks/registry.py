"""The MLflow model registry: what the register stage puts there, and how it is found again.

What a person browsing MLflow finds (the naming scheme and every tag: docs/tracking.md):
`<prefix>-<task>-base` (one version per base model, found by its `weights_sha256` tag; members
name it by its `models:/` URI, never by a path), `<prefix>-<task>-member` (one version per
member: its LoRA adapter with the transformers flavor; `load_member` rebuilds base + adapter from
the registry alone) and `<prefix>-<task>-portfolio` (one version per portfolio: the pyfunc of
palm_tasks/portfolio_model.py, which routes trait weights by the one routing rule). Alias
`production` = the current portfolio certified at its stated confidence, whose members pass the
quality gate and whose certificate the evidence does not contradict (Portfolio.blockers); any
other gets `candidate` and never moves `production`. What each version's tags and description
say is registry_text.py.

Registration is idempotent: versions, logged models and runs are found again by their
`member_key` / `portfolio_id` tags, so registering the same portfolio twice creates nothing.
Nothing here loads a pickle: adapters are safetensors, the portfolio model is logged as code
(MLflow "models from code"), and only `adapter_config.json` + `adapter_model.safetensors` of a
member directory are read (TRL's `training_args.bin` is never shipped).
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from dataclasses import replace
from importlib.metadata import version as installed_version
from pathlib import Path

from palm_tasks.config import PalmConfig
from palm_tasks.core import routing
from palm_tasks.jobs import ADAPTER_DIR, CorruptPolicyError, load_policy
from palm_tasks.llm.base_model import base_info, resolve_base_model
from palm_tasks.paths import Paths
from palm_tasks.portfolio_model import PortfolioRouter, portfolio_signature
from palm_tasks.registry_text import (log_answers, member_description, member_tags, portfolio_description,
                                      portfolio_metrics, simplex_shares)
from palm_tasks.schema import Policy
from palm_tasks.portfolio import Member, Portfolio
from palm_tasks.tracking import StoreNotWritableError, check_store_writable, lineage_tags, setup_mlflow, tracking_uri

PRODUCTION, CANDIDATE = "production", "candidate"

def _core_package(into: Path) -> Path:
    """A copy of palm_tasks.core as a package of its own (what the pyfunc model ships)."""
    package = into / "palm_tasks"
    shutil.copytree(Path(routing.__file__).parent, package / "core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (package / "__init__.py").write_text('"""The portfolio core of PALM, shipped with a portfolio model."""\n')
    return package


class RegistryUnavailableError(RuntimeError):
    """The MLflow store cannot be reached; nothing on disk is lost."""


def _one_line(exc: Exception, limit: int = 300) -> str:
    """An exception's text on one short line: SQLAlchemy's span several, with the SQL and its
    parameters, and the CLI prints one line."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def base_model_name(cfg: PalmConfig) -> str:
    return f"{cfg.mlflow.registered_model_prefix}-{cfg.task}-base"


def member_model_name(cfg: PalmConfig) -> str:
    return f"{cfg.mlflow.registered_model_prefix}-{cfg.task}-member"


def portfolio_model_name(cfg: PalmConfig) -> str:
    return f"{cfg.mlflow.registered_model_prefix}-{cfg.task}-portfolio"


def register_portfolio(cfg: PalmConfig, root: Path) -> dict:
    """Register every member of root/portfolio.json and the portfolio itself; move aliases.

    Returns {"portfolio_id", "portfolio_version", "member_versions", "base_version", "created",
    "alias", "warning"}: `created` counts new runs + logged models + model versions (0 on a re-run).
    """
    from mlflow import MlflowClient

    from palm_tasks.portfolio import load_portfolio

    root = Path(root)
    paths = Paths(root)
    portfolio = load_portfolio(root)
    policies = {m.key: _read_policy(paths, m) for m in portfolio.members}
    base_path = resolve_base_model(paths.base)
    _check_same_base(portfolio, policies, base_info(paths.base))

    uri = cfg.mlflow.tracking_uri
    try:
        uri = tracking_uri(cfg, root)
        check_store_writable(cfg, root)  # a read-only store: one line naming the file, not a traceback
        _check_reachable(uri)
        experiment_id = setup_mlflow(cfg, root)
        client = MlflowClient()
        for name in (base_model_name(cfg), member_model_name(cfg), portfolio_model_name(cfg)):
            _ensure_registered_model(client, name, cfg)
    except StoreNotWritableError:
        raise  # names the file already; what it would add (the URI) says less
    except Exception as exc:  # sqlite path unwritable, server down, ...
        raise RegistryUnavailableError(
            f"cannot reach the MLflow store {uri} ({type(exc).__name__}: "
            f"{_one_line(exc)}). Training results are safe on disk ({paths.members}, {paths.portfolio}); "
            "fix the tracking URI (params.yaml mlflow.tracking_uri) and "
            "re-run `palm stage register`."
        ) from exc

    counter = {"created": 0}
    base_version = _register_base(client, cfg, experiment_id, paths, base_path, counter)
    base_uri = f"models:/{base_model_name(cfg)}/{base_version}"
    shares = simplex_shares(portfolio, cfg.coverage.share_lattice)
    member_versions = {
        m.key: _register_member(client, cfg, experiment_id, portfolio, m, policies[m.key], base_path,
                                base_uri, shares[m.key], counter)
        for m in portfolio.members
    }
    portfolio_version = _register_portfolio_version(
        client, cfg, experiment_id, paths, portfolio, member_versions, base_uri, counter)

    name = portfolio_model_name(cfg)
    warning = None
    blockers = portfolio.blockers()
    if not blockers:
        client.set_registered_model_alias(name, PRODUCTION, portfolio_version)
        _mark_production_members(client, cfg, member_versions)
        alias = PRODUCTION
    else:
        client.set_registered_model_alias(name, CANDIDATE, portfolio_version)
        alias = CANDIDATE
        warning = (
            f"portfolio {portfolio.id[:10]} is not for production: {'; '.join(blockers)}. Registered as "
            f"{name} version {portfolio_version} with alias '{CANDIDATE}'; '{PRODUCTION}' was not moved"
        )
    return {
        "portfolio_id": portfolio.id,
        "portfolio_version": portfolio_version,
        "member_versions": member_versions,
        "base_version": base_version,
        "created": counter["created"],
        "alias": alias,
        "warning": warning,
    }


# --- the base model ----------------------------------------------------------------------------


def _register_base(client, cfg, experiment_id, paths: Paths, base_path: Path, counter) -> str:
    """The base model's version of `<prefix>-<task>-base`: found by its `weights_sha256` tag,
    else logged (weights and tokenizer, transformers flavor) and registered. Done once per base
    model: every later portfolio's members reference the same version."""
    import mlflow

    name, info = base_model_name(cfg), base_info(paths.base)
    sha = info["weights_sha256"]
    version = _find_version(client, name, "weights_sha256", sha)
    if version is None:
        model_uri = _find_logged_model(client, "weights_sha256", sha) or _log_base_model(
            client, experiment_id, paths, info, base_path, counter)
        version = mlflow.register_model(model_uri, name, tags={"weights_sha256": sha})
        client.update_model_version(name, version.version, description=(
            f"### PALM base model `{info.get('name')}` (weights sha256 `{sha[:16]}`)\n\n"
            f"The model every member of `{member_model_name(cfg)}` is a LoRA adapter of; from "
            f"`base_model: {info.get('source')}`. Load offline: "
            f"`mlflow.transformers.load_model(\"models:/{name}/{version.version}\")`."))
        counter["created"] += 1
    return str(version.version)


def _log_base_model(client, experiment_id, paths: Paths, info: dict, base_path: Path, counter) -> str:
    """Run `base-<sha[:10]>` holding the base model (fp32 safetensors and its tokenizer)."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM

    from palm_tasks.llm.models import load_tokenizer

    sha = info["weights_sha256"]
    run, is_new = _tagged_run(client, experiment_id, "weights_sha256", sha, f"base-{sha[:10]}", paths.root, counter)
    # loaded, not passed as a directory: MLflow 3.17's local-checkpoint path fails on the
    # transformers in use (AttributeError in build_flavor_config_from_local_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with mlflow.start_run(run_id=run.info.run_id):
        if is_new:
            mlflow.log_params({"source": info.get("source"), "name": info.get("name"), "weights_sha256": sha})
        logged = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": load_tokenizer(base_path)},
            name="base", task="text-generation",
            pip_requirements=_pip_requirements("torch", "transformers", "accelerate", "safetensors",
                                               "tokenizers"),
            tags={"weights_sha256": sha})
    counter["created"] += 1
    return logged.model_uri


def registered_base_dir(base_uri: str) -> Path:
    """The local directory of a registered base model version (the transformers flavor's
    layout: `model/` holds the weights, `components/tokenizer/` the tokenizer). A local store
    hands back its own directory; a remote one downloads it once per call."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(base_uri))


def load_member(member_uri: str):
    """The member's text-generation pipeline (base + LoRA adapter) from the registry alone: the
    base comes from the version its `base_model_uri` tag names, not from a path on disk."""
    import mlflow
    from mlflow import MlflowClient

    name, _, version = member_uri.removeprefix("models:/").partition("/")
    base_uri = MlflowClient().get_model_version(name, version).tags.get("base_model_uri")
    if not base_uri:
        raise LookupError(f"{member_uri} has no base_model_uri tag: register it again (palm stage register)")
    return mlflow.transformers.load_model(member_uri, base_model_path=str(registered_base_dir(base_uri) / "model"))


# --- members ---------------------------------------------------------------------------------


def _read_policy(paths: Paths, member: Member) -> Policy:
    """The member's policy directory, checked against its checksums (adapter files included)."""
    try:
        return load_policy(paths.root / member.path)
    except CorruptPolicyError as exc:
        raise FileNotFoundError(f"portfolio member {member.key}: {exc} (re-run `palm stage align`)") from None


def _check_same_base(portfolio: Portfolio, policies: dict[str, Policy], base: dict) -> None:
    """An adapter only means something on the base model it was trained on."""
    now = base.get("weights_sha256")
    for key, trained_on in [("the portfolio", portfolio.base_model_sha256),
                            *((k, p.base_model_sha256) for k, p in policies.items())]:
        if trained_on and trained_on != now:
            raise ValueError(
                f"{key if key == 'the portfolio' else 'member ' + key} was made on base model "
                f"{trained_on[:12]}, but models/base holds {str(now)[:12]}: re-run the pipeline (palm run)")


def _register_member(client, cfg, experiment_id, portfolio: Portfolio, member: Member, policy: Policy,
                     base_path, base_uri: str, share_simplex: float, counter) -> str:
    """The member's model version: found by its `member_key` tag, else logged and registered.

    A member shared with an earlier portfolio keeps its version; only its portfolio tags and
    description are brought up to date.
    """
    import mlflow

    name, key = member_model_name(cfg), member.key
    version = _find_version(client, name, "member_key", key)
    if version is None:
        model_uri = _find_logged_model(client, "member_key", key) or _log_member_model(
            client, experiment_id, portfolio, member, policy, base_path, base_uri, counter)
        version = mlflow.register_model(model_uri, name, tags={"member_key": key})
        counter["created"] += 1
    earlier = [p for p in version.tags.get("portfolios", "").split(",") if p]
    portfolios = [p for p in earlier if p != portfolio.id] + [portfolio.id]
    tags = member_tags(portfolio, member, portfolios, share_simplex)
    tags["base_model_uri"] = base_uri
    tags.setdefault("in_production", version.tags.get("in_production", "false"))
    for tag, value in tags.items():
        if version.tags.get(tag) != value:
            client.set_model_version_tag(name, version.version, tag, value)
    description = member_description(cfg, portfolio, member, member_model_name(cfg), base_uri, version.version,
                                     share_simplex)
    if version.description != description:
        client.update_model_version(name, version.version, description=description)
    return str(version.version)


def _log_member_model(client, experiment_id, portfolio: Portfolio, member: Member, policy: Policy,
                      base_path, base_uri: str, counter) -> str:
    """Log base + LoRA adapter with the transformers flavor; only the adapter is stored.

    The model goes into the member's training run when the store has it, else into a new run
    `member-<key[:10]>` that carries the weights, value vector and member.json.
    """
    import mlflow

    key, adapter_dir = member.key, policy.path / ADAPTER_DIR
    training_run = policy.training.get("mlflow_run_id")
    run, is_new = _tagged_run(client, experiment_id, "member_key", key, f"member-{key[:10]}", adapter_dir, counter,
                              found=_run_if_exists(client, training_run) if training_run else None)
    with mlflow.start_run(run_id=run.info.run_id):
        if is_new:
            mlflow.log_params({f"w.{t}": w for t, w in zip(portfolio.traits, member.weights)})
            mlflow.log_metrics({f"value.{t}": v for t, v in zip(portfolio.traits, member.value.mean)})
            mlflow.log_metrics({f"se.{t}": v for t, v in zip(portfolio.traits, member.value.se)})
        mlflow.log_dict(policy.to_json(), "member.json")
        log_answers(policy.path, portfolio.traits)
        info = mlflow.transformers.log_model(
            transformers_model=_load_peft_pipeline_parts(base_path, adapter_dir),
            name="member",
            task="text-generation",
            # MLflow records a directory here: the registered base's, inside this store (a copied
            # store's reader passes its own, as load_member does from the base_model_uri tag)
            base_model_path=str(registered_base_dir(base_uri) / "model"),
            pip_requirements=_pip_requirements("torch", "transformers", "peft", "accelerate",
                                               "safetensors", "tokenizers"),
            tags={"member_key": key},
        )
        counter["created"] += 1
    return info.model_uri


def _load_peft_pipeline_parts(base_path: Path, adapter_dir: Path) -> dict:
    """Base model (fresh, since PEFT injects layers in place) + adapter + tokenizer."""
    from palm_tasks.llm.models import load_policy as load_model

    model, tokenizer = load_model(base_path, adapter_dir, "cpu")  # reads adapter_model.safetensors
    return {"model": model, "tokenizer": tokenizer}


def _mark_production_members(client, cfg, member_versions: dict) -> None:
    """`in_production` = true on the production portfolio's members, false on the rest.

    Only tags that change are written, the new members first: each write is its own
    transaction, and a crash between two must never leave a production member marked false
    (a re-run then finds the production members already true and writes nothing). Versions are
    compared as strings: the SQLite store returns them as ints, member_versions holds strings.
    """
    name = member_model_name(cfg)
    current = {str(v) for v in member_versions.values()}
    for version in sorted(current, key=int):
        if client.get_model_version(name, version).tags.get("in_production") != "true":
            client.set_model_version_tag(name, version, "in_production", "true")
    for version in client.search_model_versions(f"name = '{name}' and tags.in_production = 'true'"):
        if str(version.version) not in current:
            client.set_model_version_tag(name, version.version, "in_production", "false")


# --- the portfolio -------------------------------------------------------------------------


def _register_portfolio_version(client, cfg, experiment_id, paths: Paths, portfolio: Portfolio,
                                member_versions, base_uri: str, counter) -> str:
    """The portfolio's model version: found by its `portfolio_id` tag, else logged."""
    import mlflow

    name, pid = portfolio_model_name(cfg), portfolio.id
    version = _find_version(client, name, "portfolio_id", pid)
    if version is None:
        model_uri = _find_logged_model(client, "portfolio_id", pid) or _log_portfolio_model(
            client, cfg, experiment_id, paths, portfolio, member_versions, base_uri, counter)
        tags = {"portfolio_id": pid, "certified": str(portfolio.certificate.certified).lower(),
                "eps": str(portfolio.eps), "delta": str(portfolio.delta),
                "members": ",".join(m.key for m in portfolio.members)}
        version = mlflow.register_model(model_uri, name, tags=tags)
        client.update_model_version(name, version.version,
                                    description=portfolio_description(cfg, portfolio, member_model_name(cfg),
                                                                                    member_versions))
        counter["created"] += 1
    return str(version.version)


def registered_copy(portfolio: Portfolio, member_name: str, member_versions: dict, base_uri: str) -> Portfolio:
    """The portfolio as the registry stores it: each member's model URI and the base model's,
    no local path (the copy must work in any checkout of the project)."""
    return replace(portfolio, base_model_uri=base_uri, members=tuple(
        replace(m, model_version=member_versions[m.key],
                model_uri=f"models:/{member_name}/{member_versions[m.key]}")
        for m in portfolio.members))


def _log_portfolio_model(client, cfg, experiment_id, paths: Paths, portfolio: Portfolio, member_versions,
                         base_uri: str, counter) -> str:
    """Run `portfolio-<id[:10]>` with params, metrics, artifacts and the router pyfunc."""
    import mlflow
    import pandas as pd
    from palm_tasks.llm.models import TOP_K

    pid = portfolio.id
    run, is_new = _tagged_run(client, experiment_id, "portfolio_id", pid, f"portfolio-{pid[:10]}", paths.root, counter)
    routed = registered_copy(portfolio, member_model_name(cfg), member_versions, base_uri)
    traits = list(portfolio.traits)
    with mlflow.start_run(run_id=run.info.run_id), tempfile.TemporaryDirectory() as tmp:
        if is_new:
            mlflow.log_params({
                "eps": portfolio.eps, "delta": portfolio.delta, "alpha": portfolio.certificate.alpha,
                "traits": ",".join(traits), "task": portfolio.task,
                "members": ",".join(m.key for m in portfolio.members),
            })
            mlflow.log_metrics(portfolio_metrics(portfolio))
            mlflow.log_artifact(str(paths.portfolio))
            if paths.plots.is_dir():
                mlflow.log_artifacts(str(paths.plots), "plots")
        code = Path(inspect.getsourcefile(PortfolioRouter))  # the model file itself (palm_tasks/portfolio_model.py)
        routed_path = Path(tmp) / "portfolio.json"
        routed_path.write_text(json.dumps(routed.to_json(), indent=2))
        temperature = next((m.temperature for m in portfolio.members if m.temperature), 0.0)
        signature = portfolio_signature(traits, temperature, TOP_K)
        # Each member's adapter ships with the portfolio (about 10 MB each); the base model is
        # referenced by its registered version (base_model_uri in portfolio.json), as the members do.
        adapters = {f"adapter_{m.key}": str(paths.root / m.path / ADAPTER_DIR) for m in portfolio.members}
        info = mlflow.pyfunc.log_model(
            name="portfolio",
            python_model=str(code),
            artifacts={"portfolio": str(routed_path), **adapters},
            code_paths=[str(_core_package(Path(tmp)))],
            signature=signature,
            input_example=pd.DataFrame([{t: 1 / len(traits) for t in traits}]),
            pip_requirements=_pip_requirements("mlflow", "numpy", "pandas", "scipy", "torch", "transformers",
                                               "peft", "accelerate", "safetensors", "tokenizers"),
            tags={"portfolio_id": pid},
        )
        counter["created"] += 1
    return info.model_uri


# --- lookups ---------------------------------------------------------------------------------


def _find_version(client, name: str, tag: str, value: str):
    found = client.search_model_versions(f"name = '{name}' and tags.{tag} = '{value}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def _find_logged_model(client, tag: str, value: str) -> str | None:
    """A model logged earlier whose registration did not happen (e.g. an interrupted run)."""
    import mlflow

    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    found = mlflow.search_logged_models(experiment_ids=experiment_ids,
                                        filter_string=f"tags.{tag} = '{value}'",
                                        output_format="list")
    ready = [m for m in found if str(m.status).endswith("READY")]
    return ready[0].model_uri if ready else None


def _tagged_run(client, experiment_id: str, tag: str, value: str, run_name: str, lineage_of: Path, counter,
                found=None):
    """(run, is_new): the run tagged `tag = value` (or `found`), created with the lineage tags of
    `lineage_of` when there is none, so that registering twice reuses the same runs."""
    if found is None:
        runs = client.search_runs([experiment_id], f"tags.{tag} = '{value}'", max_results=1)
        found = runs[0] if runs else None
    if found is not None:
        return found, False
    run = client.create_run(experiment_id, run_name=run_name, tags={tag: value, **lineage_tags(lineage_of)})
    counter["created"] += 1
    return run, True


def _run_if_exists(client, run_id: str):
    """The member's training run, or None when this store does not have it."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _check_reachable(uri: str) -> None:
    """Fail in seconds on a tracking server that is down (MLflow itself retries for minutes)."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass  # the server answered (e.g. 401): it is there
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectionError(f"no MLflow server answers at {uri}: {exc}") from exc


def _ensure_registered_model(client, name: str, cfg) -> None:
    """Create the registered model once, with a description of what its versions are."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        what = ("one version per PALM portfolio member (a LoRA adapter of the base model)"
                if name.endswith("-member") else
                "one version per PALM portfolio; alias `production` = the current certified "
                "portfolio, `candidate` = the latest uncertified one")
        client.create_registered_model(name, description=f"{what}; task `{cfg.task}`, traits "
                                                         f"{', '.join(cfg.traits)}.")


def _pip_requirements(*packages: str) -> list[str]:
    """Pinned requirements, given explicitly: MLflow's inference would import torchvision."""
    return [f"{p}=={installed_version(p).split('+')[0]}" for p in packages]
