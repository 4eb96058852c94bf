"""The stage registry and what is derived from it: dvc.yaml (each stage's code, data and params),
the Prefect stage flows, the CLI's stage names; and the project's import graph."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from palm_tasks.config import PalmConfig
from palm_tasks.paths import CUSTOM
from palm_tasks.stages import PIPELINE, STAGES

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
SECTIONS = set(PalmConfig.model_fields)


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported(name: str) -> set[str]:
    """Project modules `name` imports anywhere (function-level imports too), with their packages."""
    found = set()
    for node in ast.walk(ast.parse(module_file(name).read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    found = {m for m in found if m.split(".")[0] in ("palm_tasks", "flows") and module_file(m)}
    return found | {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}


def closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imported(m)
    return seen


def test_dvc_yaml_has_the_registry_stages_in_order():
    # the stages palm run runs, so that dvc status after palm run is clean; evaluate is no DVC stage
    assert list(DVC) == [s.name for s in PIPELINE]
    assert list(STAGES) == list(DVC) + ["evaluate"]
    for name, stage in DVC.items():
        assert stage["cmd"] == f"palm stage {name}"


@pytest.mark.parametrize("name", [s.name for s in PIPELINE])
def test_each_stage_depends_on_every_module_it_imports(name):
    deps = [d for d in DVC[name]["deps"]]
    needed = sorted(str(module_file(m).relative_to(ROOT)) for m in closure(f"palm_tasks.stages.{name}"))
    missing = [f for f in needed if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]
    assert not missing, f"dvc.yaml stage {name} lacks deps on {missing}"
    assert all((ROOT / d).exists() or d in [o for s in STAGES.values() for o in s.outs] for d in deps)


@pytest.mark.parametrize("name", [s.name for s in PIPELINE])
def test_each_stage_declares_its_data_params_and_outputs_in_dvc_yaml(name):
    stage, entry = STAGES[name], DVC[name]
    assert set(stage.deps) <= set(entry["deps"])
    assert set(entry["params"]) == set(stage.params)
    outs = {next(iter(o)) if isinstance(o, dict) else o
            for key in ("outs", "metrics", "plots") for o in entry.get(key, [])}
    assert set(stage.outs) == outs


@pytest.mark.parametrize("name", list(STAGES))
def test_what_a_stage_reads_an_earlier_stage_writes(name):
    # evaluate is in no dvc.yaml, so its declarations are checked here and below, not against DVC
    order = list(STAGES.values())  # the pipeline's stages in order, then evaluate
    stage = STAGES[name]
    earlier = [o for s in order[: order.index(stage)] for o in s.outs] + [CUSTOM]  # custom/: the user's own
    assert all(any(d == o or d.startswith(o + "/") for o in earlier) for d in stage.deps), stage.deps
    later = {o for s in order[order.index(stage) + 1:] for o in s.outs}
    assert not set(stage.outs) & later, "two stages write the same output"


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_lists_every_config_section_it_reads(name):
    stage = STAGES[name]
    listed = {p.split(".")[0] for p in stage.params}
    source = module_file(f"palm_tasks.stages.{name}").read_text()
    read = {m for m in re.findall(r"\bcfg\.(\w+)", source) if m in SECTIONS}
    read |= {"traits"} if re.search(r"\bcfg\.d\b", source) else set()
    if stage.runs_jobs:  # a job's result depends on these (palm_tasks/jobs.py)
        from palm_tasks.jobs import JOB_PARAMS

        read |= set(JOB_PARAMS)
    assert read <= listed, f"{name} reads {sorted(read - listed)} but its PARAMS do not list them"


def test_flows_and_cli_are_derived_from_the_registry():
    from flows.cli import build_parser
    from flows.stages import STAGE_FLOWS

    assert list(STAGE_FLOWS) == list(STAGES)
    assert all(STAGE_FLOWS[n].name == n for n in STAGES)
    stage_parser = build_parser()._subparsers._group_actions[0].choices["stage"]
    (name_arg,) = [a for a in stage_parser._actions if a.dest == "name"]
    assert list(name_arg.choices) == list(STAGES)


def test_no_import_cycle_in_the_project():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for top in ("palm_tasks", "flows") for p in (ROOT / top).rglob("*.py")}
    graph = {m: {i for i in imported(m) if i in modules and not m.startswith(i + ".") and i != m}
             for m in modules}
    # a package importing its own submodules (core/__init__.py re-exporting) is not a cycle
    graph = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [])


def test_the_core_imports_nothing_but_itself_numpy_and_scipy():
    for path in (ROOT / "palm_tasks" / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                top = n.split(".")[0]
                assert top in ("numpy", "scipy", "dataclasses", "itertools", "math", "collections", "typing", "functools") \
                    or n.startswith("palm_tasks.core"), f"{path.name} imports {n}"


def test_palm_tasks_imports_no_prefect():
    for path in (ROOT / "palm_tasks").rglob("*.py"):
        assert "prefect" not in {n.split(".")[0] for n in closure_names(path)}, path


def closure_names(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def _project_modules() -> set[str]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for top in ("palm_tasks", "flows") for p in (ROOT / top).rglob("*.py")}


def test_no_stage_module_imports_another_stage():
    # a stage reads what earlier stages wrote, never their code: shared work lives outside stages/
    for name in STAGES:
        module = f"palm_tasks.stages.{name}"
        others = {f"palm_tasks.stages.{n}" for n in STAGES if n != name}
        assert not imported(module) & others, f"{module} imports {sorted(imported(module) & others)}"


def test_every_module_under_palm_tasks_is_used_by_the_product():
    # the product's entry points: the `palm` command, `python -m palm_tasks.params_yaml`, and the
    # stage modules, which palm_tasks.stages imports by name (importlib); a module no entry point
    # reaches (a shim, a helper only tests use) has no place under palm_tasks/
    roots = ["flows.cli", "palm_tasks.params_yaml", *(f"palm_tasks.stages.{n}" for n in STAGES)]
    reached = set().union(*(closure(r) for r in roots))
    unused = sorted(m for m in _project_modules() if m.startswith("palm_tasks") and m not in reached)
    assert unused == [], f"modules under palm_tasks/ that no production code imports: {unused}"


def test_the_traits_module_names_every_built_in_reward():
    from palm_tasks.llm.rewards import REWARD_CLASSES
    from palm_tasks.traits import BUILTIN_TRAITS

    assert tuple(REWARD_CLASSES) == BUILTIN_TRAITS
