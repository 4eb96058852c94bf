"""Stage 5, register: put the certified portfolio in the MLflow model registry.

What a person browsing MLflow finds (the naming scheme, documented in the README):

- `<prefix>-<task>-member`: one version per portfolio member. The version holds the LoRA
  adapter, logged with the transformers flavor and `base_model_path` (the local base model
  directory), so `mlflow.transformers.load_model(uri)` rebuilds base + adapter offline. Tags:
  `member_key`, `w.<trait>`, `value.<trait>`, `se.<trait>`, `share` (of sampled users),
  `share_simplex`, `portfolio_id`, `portfolios` (every portfolio it has been in), `certified`,
  `in_production`; the description says the same in words, with the certificate.
- `<prefix>-<task>-portfolio`: one version per portfolio: a small pyfunc whose artifact is
  portfolio.json (with each member's registered model URI) and whose `predict` maps a
  DataFrame of trait weights to the best member by argmax of w . values. Tags: `portfolio_id`,
  `certified`, `eps`, `delta`, `members`. Alias `production` = the current certified
  portfolio; an uncertified one gets alias `candidate` and never moves `production`.
- Runs: `member-<key[:10]>` (only when the member's training run is not in the store; then the
  model goes into the training run) and `portfolio-<id[:10]>` (params, certificate and coverage
  metrics, portfolio.json, plots/).

Registration is idempotent: versions, logged models and runs are found again by their
`member_key` / `portfolio_id` tags, so registering the same portfolio twice creates nothing.
Nothing here loads a pickle: adapters are safetensors, the portfolio model is logged as code
(MLflow "models from code"), and only `adapter_config.json` + `adapter_model.safetensors` of a
member directory are read (TRL's `training_args.bin` is never shipped).
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path

from palm_tasks.base_model import base_info, resolve_base_model
from palm_tasks.config import PalmConfig
from palm_tasks.layout import Layout
from palm_tasks.tracking import lineage_tags, setup_mlflow, tracking_uri

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PRODUCTION, CANDIDATE = "production", "candidate"
SHARE_LATTICE = 30  # step of the simplex lattice a member's share of the simplex is measured on

# The portfolio's pyfunc model, logged as code so that loading it never unpickles anything.
# It reads only its own artifact (portfolio.json) and needs numpy and pandas.
ROUTER_MODEL_SOURCE = '''\
"""PALM portfolio router: trait weights -> the member with the best w . values."""
import json

import mlflow
import numpy as np
import pandas as pd


class PortfolioRouter(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        portfolio = json.loads(open(context.artifacts["portfolio"]).read())
        self.traits = portfolio["traits"]
        self.members = portfolio["members"]
        self.values = np.array([[m["values"][t] for t in self.traits] for m in self.members])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        weights = pd.DataFrame(model_input)[self.traits].to_numpy(dtype=float)
        scores = weights @ self.values.T
        best = scores.argmax(axis=1)
        return pd.DataFrame({
            "member_key": [self.members[i]["key"] for i in best],
            "model_uri": [self.members[i]["model_uri"] for i in best],
            "value": scores[np.arange(len(best)), best],
        })


mlflow.models.set_model(PortfolioRouter())
'''


class RegistryUnavailableError(RuntimeError):
    """The MLflow store cannot be reached; nothing on disk is lost."""


def member_model_name(cfg: PalmConfig) -> str:
    return f"{cfg.mlflow.registered_model_prefix}-{cfg.task}-member"


def portfolio_model_name(cfg: PalmConfig) -> str:
    return f"{cfg.mlflow.registered_model_prefix}-{cfg.task}-portfolio"


def register_portfolio(cfg: PalmConfig, root: Path) -> dict:
    """Register every member of root/portfolio.json and the portfolio itself; move aliases.

    Returns {"portfolio_id", "portfolio_version", "member_versions", "created", "alias",
    "warning"}: `created` counts new runs + logged models + model versions (0 on a re-run).
    """
    from mlflow import MlflowClient

    root = Path(root)
    layout = Layout(root)
    if not layout.portfolio.is_file():
        raise FileNotFoundError(f"{layout.portfolio} is missing: run the coverage stage first "
                                "(palm stage coverage)")
    portfolio = json.loads(layout.portfolio.read_text())
    members = {m["key"]: _read_member(layout, m["key"]) for m in portfolio["members"]}
    base_path = resolve_base_model(layout.base)
    _check_same_base(members, base_info(layout.base))

    uri = cfg.mlflow.tracking_uri
    try:
        uri = tracking_uri(cfg, root)
        _check_reachable(uri)
        experiment_id = setup_mlflow(cfg, root)
        client = MlflowClient()
        for name in (member_model_name(cfg), portfolio_model_name(cfg)):
            _ensure_registered_model(client, name, cfg)
    except Exception as exc:  # sqlite path unwritable, server down, ...
        raise RegistryUnavailableError(
            f"cannot reach the MLflow store {uri} ({type(exc).__name__}: "
            f"{exc}). Training results are safe on disk ({layout.members}, {layout.portfolio}); "
            "fix the tracking URI (params.yaml mlflow.tracking_uri) and "
            "re-run `palm stage register`."
        ) from exc

    counter = {"created": 0}
    member_versions = {
        m["key"]: _register_member(client, cfg, experiment_id, portfolio, m, members[m["key"]],
                                   _member_dir(layout, m["key"]) / "adapter", base_path, counter)
        for m in portfolio["members"]
    }
    portfolio_version = _register_portfolio_version(
        client, cfg, experiment_id, layout, portfolio, member_versions, counter)

    certified = bool(portfolio["certificate"]["certified"])
    name = portfolio_model_name(cfg)
    warning = None
    if certified:
        client.set_registered_model_alias(name, PRODUCTION, portfolio_version)
        _mark_production_members(client, cfg, member_versions)
        alias = PRODUCTION
    else:
        client.set_registered_model_alias(name, CANDIDATE, portfolio_version)
        alias = CANDIDATE
        cert = portfolio["certificate"]
        warning = (
            f"portfolio {portfolio['id'][:10]} is NOT certified for (eps={portfolio['eps']}, "
            f"delta={portfolio['delta']}) (worst slack {cert.get('worst_slack')}, reaches "
            f"eps={cert.get('max_eps')}, delta={cert.get('max_delta')}): registered as "
            f"{name} version {portfolio_version} with alias '{CANDIDATE}'; "
            f"'{PRODUCTION}' was not moved"
        )
    return {
        "portfolio_id": portfolio["id"],
        "portfolio_version": portfolio_version,
        "member_versions": member_versions,
        "created": counter["created"],
        "alias": alias,
        "warning": warning,
    }


# --- members ---------------------------------------------------------------------------------


def _member_dir(layout: Layout, key: str) -> Path:
    """A trained member's directory, or a Rewarded-Soups candidate's (palm_tasks.soups)."""
    return layout.soups / key if (layout.soups / key).is_dir() else layout.member(key)


def _read_member(layout: Layout, key: str) -> dict:
    """member.json of one member, after checking that its adapter files are there."""
    member_dir = _member_dir(layout, key)
    for path in [member_dir / "member.json"] + [member_dir / "adapter" / f for f in ADAPTER_FILES]:
        if not path.is_file():
            raise FileNotFoundError(
                f"portfolio member {key}: {path} is missing (re-run `palm stage align`)")
    return json.loads((member_dir / "member.json").read_text())


def _check_same_base(members: dict, base: dict) -> None:
    """An adapter only means something on the base model it was trained on."""
    for key, member in members.items():
        trained_on = (member.get("base_model") or {}).get("weights_sha256")
        if trained_on and trained_on != base.get("weights_sha256"):
            raise ValueError(
                f"member {key} was trained on base model {trained_on[:12]}, but models/base "
                f"holds {str(base.get('weights_sha256'))[:12]}: re-run the pipeline (palm run)")


def _register_member(client, cfg, experiment_id, portfolio, entry, member, adapter_dir,
                     base_path, counter) -> str:
    """The member's model version: found by its `member_key` tag, else logged and registered.

    A member shared with an earlier portfolio keeps its version; only its portfolio tags and
    description are brought up to date.
    """
    import mlflow

    name, key = member_model_name(cfg), entry["key"]
    version = _find_version(client, name, "member_key", key)
    if version is None:
        model_uri = _find_logged_model(client, "member_key", key) or _log_member_model(
            client, experiment_id, entry, member, adapter_dir, base_path, counter)
        version = mlflow.register_model(model_uri, name, tags={"member_key": key})
        counter["created"] += 1
    earlier = [p for p in version.tags.get("portfolios", "").split(",") if p]
    portfolios = [p for p in earlier if p != portfolio["id"]] + [portfolio["id"]]
    tags = _member_tags(portfolio, entry, portfolios)
    tags.setdefault("in_production", version.tags.get("in_production", "false"))
    for tag, value in tags.items():
        if version.tags.get(tag) != value:
            client.set_model_version_tag(name, version.version, tag, value)
    description = _member_description(cfg, portfolio, entry, base_path, version.version,
                                      simplex_shares(portfolio)[key])
    if version.description != description:
        client.update_model_version(name, version.version, description=description)
    return str(version.version)


def simplex_shares(portfolio: dict, divisions: int = SHARE_LATTICE) -> dict[str, float]:
    """Each member's share of a simplex lattice: the weights it serves, as the router routes."""
    import numpy as np

    from palm_tasks.grid import simplex_lattice

    traits, z = portfolio["traits"], float(portfolio.get("z", 0.0))
    values = np.array([[m["values"][t] - z * m["std_errors"][t] for t in traits]
                       for m in portfolio["members"]])
    served = np.argmax(simplex_lattice(len(traits), divisions) @ values.T, axis=1)
    return {m["key"]: float(np.mean(served == i)) for i, m in enumerate(portfolio["members"])}


def _member_tags(portfolio: dict, entry: dict, portfolios: list[str]) -> dict:
    tags = {"member_key": entry["key"], "portfolio_id": portfolio["id"],
            "portfolios": ",".join(portfolios), "share": f"{entry['share']:.4f}",
            "share_simplex": f"{simplex_shares(portfolio)[entry['key']]:.4f}",
            "certified": str(bool(portfolio["certificate"]["certified"])).lower()}
    for trait in portfolio["traits"]:
        tags[f"w.{trait}"] = f"{entry['weights'][trait]:.4f}"
        tags[f"value.{trait}"] = f"{entry['values'][trait]:.4f}"
        tags[f"se.{trait}"] = f"{entry['std_errors'][trait]:.4f}"
    tags["kind"] = entry.get("kind", "member")
    if tags["kind"] == "soup":  # no training run: an interpolation of these members' adapters
        tags["ingredients"] = ",".join(entry["ingredients"])
        tags["lambdas"] = ",".join(f"{x:.4f}" for x in entry["lambdas"])
    return tags


def _member_description(cfg, portfolio: dict, entry: dict, base_path: Path, version,
                        share_simplex: float) -> str:
    """Markdown for the MLflow UI: what the member was trained for and how well it does."""
    rows = "\n".join(
        f"| {t} | {entry['weights'][t]:.3f} | {entry['values'][t]:.3f} ± "
        f"{entry['std_errors'][t]:.3f} |" for t in portfolio["traits"])
    return (
        f"### PALM member `{entry['key'][:10]}` ({cfg.task})\n\n"
        f"LoRA adapter of the base model at `{base_path}`, trained with reward weights w.\n\n"
        f"| trait | weight w | value ± standard error |\n|---|---|---|\n{rows}\n\n"
        f"**Serves {100 * entry['share']:.1f}% of users** (sampled Dirichlet(1) users routed to "
        f"it) and **{100 * share_simplex:.1f}% of the simplex** (a lattice of weights of step "
        f"1/{SHARE_LATTICE}): the weights for which this member has the best w . values.\n\n"
        f"{_certificate_text(portfolio)}\n\n"
        f"Load offline: `mlflow.transformers.load_model(\"models:/{member_model_name(cfg)}/"
        f"{version}\")` (reads the base model from the path above)."
    )


def _certificate_text(portfolio: dict) -> str:
    cert = portfolio["certificate"]
    status = "**certified**" if cert["certified"] else "**not certified**"
    return (
        f"Portfolio `{portfolio['id'][:10]}` ({len(portfolio['members'])} members out of "
        f"{len(portfolio.get('pool', []))} trained) is {status} for "
        f"(eps = {portfolio['eps']}, delta = {portfolio['delta']}, z = {portfolio.get('z', 0)}): "
        f"for every weight vector w some member reaches (1 - eps) * OPT(w) - delta, OPT relative "
        f"to {cert.get('relative_to', 'the trained pool')}. Worst slack {cert.get('worst_slack')}"
        f"; reached eps = {cert.get('max_eps')}, delta = {cert.get('max_delta')}."
    )


def _log_member_model(client, experiment_id, entry, member, adapter_dir, base_path,
                      counter) -> str:
    """Log base + LoRA adapter with the transformers flavor; only the adapter is stored.

    The model goes into the member's training run when the store has it, else into a new run
    `member-<key[:10]>` that carries the weights, value vector and member.json.
    """
    import mlflow

    key = entry["key"]
    training_run = member.get("mlflow_run_id")
    run = (_run_if_exists(client, training_run) if training_run else None) or _find_run(
        client, experiment_id, "member_key", key)
    is_new = run is None
    if is_new:
        run = client.create_run(experiment_id, run_name=f"member-{key[:10]}",
                                tags={"member_key": key, **lineage_tags(adapter_dir)})
        counter["created"] += 1
    with mlflow.start_run(run_id=run.info.run_id):
        if is_new:
            mlflow.log_params({f"w.{t}": w for t, w in entry["weights"].items()})
            mlflow.log_metrics({f"value.{t}": v for t, v in entry["values"].items()})
            mlflow.log_metrics({f"se.{t}": v for t, v in entry["std_errors"].items()})
        mlflow.log_dict(member, "member.json")
        info = mlflow.transformers.log_model(
            transformers_model=_load_peft_pipeline_parts(base_path, adapter_dir),
            name="member",
            task="text-generation",
            base_model_path=str(base_path),
            pip_requirements=_pip_requirements("torch", "transformers", "peft", "accelerate",
                                               "safetensors", "tokenizers"),
            tags={"member_key": key},
        )
        counter["created"] += 1
    return info.model_uri


def _load_peft_pipeline_parts(base_path: Path, adapter_dir: Path) -> dict:
    """Base model (fresh, since PEFT injects layers in place) + adapter + tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_path)
    model = PeftModel.from_pretrained(base, adapter_dir)  # reads adapter_model.safetensors
    return {"model": model, "tokenizer": AutoTokenizer.from_pretrained(base_path)}


def _mark_production_members(client, cfg, member_versions: dict) -> None:
    """`in_production` = true on the production portfolio's members, false on the rest."""
    name = member_model_name(cfg)
    current = set(member_versions.values())
    for version in client.search_model_versions(f"name = '{name}' and tags.in_production = 'true'"):
        if version.version not in current:
            client.set_model_version_tag(name, version.version, "in_production", "false")
    for version in current:
        client.set_model_version_tag(name, version, "in_production", "true")


# --- the portfolio -------------------------------------------------------------------------


def _register_portfolio_version(client, cfg, experiment_id, layout, portfolio, member_versions,
                                counter) -> str:
    """The portfolio's model version: found by its `portfolio_id` tag, else logged."""
    import mlflow

    name, pid = portfolio_model_name(cfg), portfolio["id"]
    version = _find_version(client, name, "portfolio_id", pid)
    if version is None:
        model_uri = _find_logged_model(client, "portfolio_id", pid) or _log_portfolio_model(
            client, cfg, experiment_id, layout, portfolio, member_versions, counter)
        tags = {"portfolio_id": pid,
                "certified": str(bool(portfolio["certificate"]["certified"])).lower(),
                "eps": str(portfolio["eps"]), "delta": str(portfolio["delta"]),
                "members": ",".join(m["key"] for m in portfolio["members"])}
        version = mlflow.register_model(model_uri, name, tags=tags)
        client.update_model_version(name, version.version,
                                    description=_portfolio_description(cfg, portfolio,
                                                                       member_versions))
        counter["created"] += 1
    return str(version.version)


def _portfolio_description(cfg, portfolio: dict, member_versions: dict) -> str:
    rows = "\n".join(
        f"| `{m['key'][:10]}` | {member_versions[m['key']]} | "
        + " | ".join(f"{m['weights'][t]:.2f}" for t in portfolio["traits"])
        + f" | {100 * m['share']:.1f}% |" for m in portfolio["members"])
    header = " | ".join(f"w.{t}" for t in portfolio["traits"])
    dashes = "|".join("---" for _ in portfolio["traits"])
    return (
        f"### PALM portfolio `{portfolio['id'][:10]}` ({cfg.task})\n\n"
        f"{_certificate_text(portfolio)}\n\n"
        f"| member | version of `{member_model_name(cfg)}` | {header} | users served |\n"
        f"|---|---|{dashes}|---|\n{rows}\n\n"
        "`mlflow.pyfunc.load_model(uri).predict(DataFrame of trait weights)` returns the best "
        "member's key and model URI for each row (argmax of w . values)."
    )


def _log_portfolio_model(client, cfg, experiment_id, layout, portfolio, member_versions,
                         counter) -> str:
    """Run `portfolio-<id[:10]>` with params, metrics, artifacts and the router pyfunc."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    pid = portfolio["id"]
    run = _find_run(client, experiment_id, "portfolio_id", pid)
    is_new = run is None
    if is_new:
        run = client.create_run(experiment_id, run_name=f"portfolio-{pid[:10]}",
                                tags={"portfolio_id": pid, **lineage_tags(layout.root)})
        counter["created"] += 1
    member_name = member_model_name(cfg)
    routed = dict(portfolio, base_model_path=str(resolve_base_model(layout.base)), members=[
        dict(m, model_version=member_versions[m["key"]],
             model_uri=f"models:/{member_name}/{member_versions[m['key']]}")
        for m in portfolio["members"]])
    with mlflow.start_run(run_id=run.info.run_id), tempfile.TemporaryDirectory() as tmp:
        if is_new:
            mlflow.log_params({
                "eps": portfolio["eps"], "delta": portfolio["delta"], "z": portfolio.get("z", 0),
                "traits": ",".join(portfolio["traits"]), "task": portfolio["task"],
                "members": ",".join(m["key"] for m in portfolio["members"]),
            })
            mlflow.log_metrics(_portfolio_metrics(portfolio))
            mlflow.log_artifact(str(layout.portfolio))
            if layout.plots.is_dir():
                mlflow.log_artifacts(str(layout.plots), "plots")
        code = Path(tmp) / "portfolio_router.py"
        code.write_text(ROUTER_MODEL_SOURCE)
        routed_path = Path(tmp) / "portfolio.json"
        routed_path.write_text(json.dumps(routed, indent=2))
        signature = ModelSignature(
            inputs=Schema([ColSpec("double", t) for t in portfolio["traits"]]),
            outputs=Schema([ColSpec("string", "member_key"), ColSpec("string", "model_uri"),
                            ColSpec("double", "value")]))
        info = mlflow.pyfunc.log_model(
            name="portfolio",
            python_model=str(code),
            artifacts={"portfolio": str(routed_path)},
            signature=signature,
            input_example=pd.DataFrame([{t: 1 / len(portfolio["traits"]) for t in portfolio["traits"]}]),
            pip_requirements=_pip_requirements("mlflow", "numpy", "pandas"),
            tags={"portfolio_id": pid},
        )
        counter["created"] += 1
    return info.model_uri


def _portfolio_metrics(portfolio: dict) -> dict:
    """Certificate figures plus every number in the coverage summary (flattened names)."""
    cert = portfolio["certificate"]
    metrics = {"certified": float(bool(cert["certified"])),
               "n_members": float(len(portfolio["members"])),
               "n_trained": float(len(portfolio.get("pool", [])))}
    for field in ("worst_slack", "max_eps", "max_delta"):
        if isinstance(cert.get(field), (int, float)):
            metrics[f"certificate.{field}"] = float(cert[field])

    def flatten(prefix, value):
        if isinstance(value, bool):
            metrics[prefix] = float(value)
        elif isinstance(value, (int, float)):
            metrics[prefix] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}", v)

    flatten("coverage", portfolio.get("coverage", {}))
    return metrics


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


def _find_run(client, experiment_id: str, tag: str, value: str):
    found = client.search_runs([experiment_id], f"tags.{tag} = '{value}'", max_results=1)
    return found[0] if found else None


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
