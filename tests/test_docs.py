"""The docs check: every relative link in README.md and docs/ reaches a file (and a heading, when
it names one), and every code name in backticks that names something of this repository exists.

What counts as a code name, and how it is checked:
- a repository path (`palm_tasks/gate.py`, `tests/test_x.py::test_y`, `benchmarks/`): a file or
  folder git knows (tracked, or new and not ignored); `X.py::name` also needs `def name` or
  `class name` in X.py. A `.py` name without its folder (`core/routing.py`, `test_grid.py`) must
  end the path of one such file.
- a dotted name whose first part is a top-level section of params.yaml (`coverage.eps`): a key of
  params.yaml as it is now (read at test time, so new keys need no change here); below a setting
  whose value is a mapping (`rewards.models.<name>`) the names are the user's.
- a dotted Python name in palm_tasks or flows (`palm_tasks.tracking.relocate_store`,
  `core.routing.route` relative to palm_tasks, `module:function`): the module's file exists and
  defines the name at its top level (a class's attribute one level further), read with ast,
  never imported (importing torch would cost seconds).
A dotted name passes if it is either a params key or a Python name. Text in fenced code blocks is
not checked (it shows output and code, not references). Names that no repository file can hold
(outputs such as `data/pool.json`, placeholders with <...>) are not code names.
"""

from __future__ import annotations

import ast
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Top-level folders and files whose paths are checked: the ones the repository's code lives in.
# Output folders (data/, models/, metrics/, plots/, mlruns/, reports/) are made by runs and are
# not checked.
SOURCE_ROOTS = ("palm_tasks", "flows", "tests", "benchmarks", "docs", "custom", ".ci", ".dvc")
ROOT_FILES = ("README.md", "Makefile", "params.yaml", "dvc.yaml", "pyproject.toml", "prefect.yaml",
              ".gitignore", ".dvcignore")
PY_PACKAGES = ("palm_tasks", "flows")

# Paths the docs name that a run writes and no clone holds, each with the reason.
NOT_YET_WRITTEN = {
    # written by the GPU check, which has never run on a GPU (docs/gpu.md)
    "benchmarks/results/gpu_check.json",
    # the MLflow UI test's screenshots (git-ignored)
    "tests/artifacts/",
    # DVC's cache, made by dvc and ignored by .dvc/.gitignore
    ".dvc/cache",
}


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
FENCE = re.compile(r"^\s*(```|~~~)")
PATH_LIKE = re.compile(r"^\.?[A-Za-z0-9_][A-Za-z0-9_.\-/]*(::[A-Za-z0-9_\[\]\-]+)?$")
DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+(:[A-Za-z_][A-Za-z0-9_.]*)?$")
COLON_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


# ---------------------------------------------------------------------------------------------
# What exists


@lru_cache(maxsize=4)
def repo_files(root: Path = ROOT) -> frozenset[str]:
    """Files a clone holds plus new ones not ignored; every folder of them ends with '/'."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "--cached", "--others",
                              "--exclude-standard", "-z"], capture_output=True, check=True,
                             text=True, timeout=30).stdout
        files = {f for f in out.split("\0") if f and (root / f).exists()}
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "__pycache__", "data", "models", "metrics", "plots", "mlruns"}
        files = {p.relative_to(root).as_posix() for p in root.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(root).parts)}
    folders = {"/".join(f.split("/")[:i]) + "/" for f in files for i in range(1, f.count("/") + 1)}
    return frozenset(files | folders)


def path_exists(rel: str, root: Path = ROOT) -> bool:
    rel = rel.strip("/") if rel not in ("", "/") else ""
    files = repo_files(root)
    return rel == "" or rel in files or rel + "/" in files


@lru_cache(maxsize=4)
def params_tree(root: Path = ROOT) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def is_params_key(name: str, root: Path = ROOT) -> bool | None:
    """True: a key of params.yaml; False: starts with a section but is none; None: not a key form."""
    parts = name.split(".")
    node = params_tree(root)
    if not isinstance(node.get(parts[0]), dict):
        return None
    for part in parts:
        if not isinstance(node, dict):
            return False  # below a plain setting
        if part not in node:
            return False
        node = node[part]
        if isinstance(node, dict) and not node:
            return True  # a mapping setting such as rewards.models: the names below are the user's
    return True


@lru_cache(maxsize=256)
def _module_defs(path: Path) -> dict[str, set[str] | None]:
    """Top-level names of a module; a class maps to its attributes, anything else to None."""
    tree = ast.parse(path.read_text())
    names: dict[str, set[str] | None] = {}

    def targets(node) -> list[str]:
        if isinstance(node, ast.Name):
            return [node.id]
        if isinstance(node, (ast.Tuple, ast.List)):
            return [n for e in node.elts for n in targets(e)]
        return []

    def add(body, into: dict | set) -> None:
        for node in body:
            found: list[str] = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found = [node.name]
            elif isinstance(node, ast.ClassDef):
                if isinstance(into, dict):
                    attrs: set[str] = set()
                    add(node.body, attrs)
                    into[node.name] = attrs
                    continue
                found = [node.name]
            elif isinstance(node, ast.Assign):
                found = [n for t in node.targets for n in targets(t)]
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                found = targets(node.target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                found = [(a.asname or a.name).split(".")[0] for a in node.names]
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                add(node.body, into)
                add(getattr(node, "orelse", []), into)
                for handler in getattr(node, "handlers", []):
                    add(handler.body, into)
                continue
            for n in found:
                if isinstance(into, dict):
                    into.setdefault(n, None)
                else:
                    into.add(n)

    add(tree.body, names)
    return names


@lru_cache(maxsize=4)
def _modules(root: Path = ROOT) -> dict[str, list[Path]]:
    """Every module file of palm_tasks and flows by its dotted path, and by its bare name."""
    found: dict[str, list[Path]] = {}
    for package in PY_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            dotted = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            found.setdefault(dotted, []).append(path)
            found.setdefault(dotted.split(".")[-1], []).append(path)
    return found


def _class_attr(name: str, root: Path = ROOT) -> bool | None:
    """`Class.attr` for a class defined in palm_tasks or flows: whether one such class has attr."""
    cls, _, attr = name.partition(".")
    if not cls[:1].isupper() or "." in attr:
        return None
    classes = [defs[cls] for paths in _modules(root).values() for path in paths
               for defs in [_module_defs(path)] if isinstance(defs.get(cls), set)]
    return any(attr in c for c in classes) if classes else None


def is_python_name(name: str, root: Path = ROOT) -> bool | None:
    """True: a module of palm_tasks/flows, or a name it defines; False: rooted in one of them but
    missing; None: not rooted there (someone else's package, or not Python)."""
    module, _, attr = name.partition(":")
    parts = module.split(".") + (attr.split(".") if attr else [])
    if not attr and len(parts) == 2 and parts[0] not in PY_PACKAGES and _class_attr(module, root) is not None:
        return _class_attr(module, root)
    for prefix in ((), ("palm_tasks",)):
        full = list(prefix) + parts
        if full[0] not in PY_PACKAGES:
            continue
        if not (root / full[0]).is_dir():
            continue
        if prefix:
            # relative to palm_tasks: `module.name`, `package.module.name`, `package.name` (a name
            # its __init__ defines), or a module's bare name where only one module has it
            # (`validity.answer_quality`); anything else (`core.no_scm`, a DVC setting) is not ours
            package_init = root / "palm_tasks" / parts[0] / "__init__.py"
            if (root / "palm_tasks" / f"{parts[0]}.py").is_file():
                pass
            elif package_init.is_file() and len(parts) > 1 and (
                    (root / "palm_tasks" / parts[0] / f"{parts[1]}.py").is_file()
                    or parts[1] in _module_defs(package_init)):
                pass
            elif len(_modules(root).get(parts[0], [])) == 1 and len(parts) > 1:
                # a bare module name only confirms: `certificate.statement` is also a JSON field
                defs = _module_defs(_modules(root)[parts[0]][0])
                if parts[1] in defs and (len(parts) == 2 or defs[parts[1]] is None
                                         or parts[2] in defs[parts[1]]):
                    return True
                continue
            else:
                continue
        # the longest prefix that is a module or package
        for i in range(len(full), 0, -1):
            base = root.joinpath(*full[:i])
            path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if path.is_file():
                rest = full[i:]
                break
        else:
            return False
        if attr and len(module.split(".")) + len(prefix) != i:
            return False  # module:function, and the module part is not a module
        if not rest:
            return True
        defs = _module_defs(path)
        if rest[0] not in defs:
            if path.name == "__init__.py" and (base / f"{rest[0]}.py").is_file():
                return True
            return False
        attrs = defs[rest[0]]
        return len(rest) == 1 or attrs is None or rest[1] in attrs
    return None


# ---------------------------------------------------------------------------------------------
# Reading a page


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces -> '-')."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_fence or not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def check_links(page: Path, root: Path = ROOT) -> list[Problem]:
    problems = []
    rel_page = page.relative_to(root).as_posix()
    for number, line in prose_lines(page.read_text()):
        for target in LINK.findall(CODE_SPAN.sub("``", line)):
            if re.match(r"^[a-z][a-z0-9+.\-]*:", target, re.I):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            if file_part:
                resolved = (page.parent / file_part).resolve()
                try:
                    rel = resolved.relative_to(root).as_posix()
                except ValueError:
                    problems.append(Problem(rel_page, number, f"link {target!r} leaves the repository"))
                    continue
                if not path_exists(rel, root):
                    problems.append(Problem(rel_page, number, f"link {target!r}: no file {rel}"))
                    continue
            else:
                resolved = page
            if anchor and resolved.suffix == ".md" and resolved.is_file():
                if anchor.lower() not in heading_anchors(resolved.read_text()):
                    problems.append(Problem(rel_page, number, f"link {target!r}: no heading #{anchor} "
                                            f"in {resolved.relative_to(root).as_posix()}"))
    return problems


def _looks_like_repo_path(span: str) -> bool:
    head = span.split("/")[0]
    return (("/" in span and (head in SOURCE_ROOTS))
            or span in ROOT_FILES or span.split("::")[0] in ROOT_FILES)


def check_code_name(span: str, root: Path = ROOT) -> str | None:
    """Why the name in backticks does not exist, or None."""
    span = span.strip()
    setting = re.match(r"^([A-Za-z_][\w.]*): \S", span)  # `search.max_trainings: 8`: the key is checked
    if setting:
        span = setting.group(1)
    if not span or "<" in span or "*" in span or "{" in span or " " in span or "..." in span:
        return None
    if span.startswith("./"):
        span = span[2:]
    if PATH_LIKE.match(span) and ("/" in span or span.endswith(".py") or "::" in span
                                  or span in ROOT_FILES):
        file_part, _, test = span.partition("::")
        if file_part.rstrip("/") in {p.rstrip("/") for p in NOT_YET_WRITTEN}:
            return None
        if _looks_like_repo_path(file_part):
            if not path_exists(file_part, root):
                return f"no file or folder {file_part}"
            found = file_part
        elif file_part.endswith(".py"):
            matches = sorted(f for f in repo_files(root) if f == file_part or f.endswith("/" + file_part))
            if not matches:
                return f"no file named {file_part} (nor any path ending so)"
            found = matches[0]
        else:
            return None  # an output or someone else's path: not a name of this repository
        if test:
            name = test.split("[")[0]
            if not re.search(rf"^\s*(async\s+)?(def|class)\s+{re.escape(name)}\b",
                             (root / found).read_text(), re.M):
                return f"no test or function {name} in {found}"
        return None
    if DOTTED.match(span) or COLON_NAME.match(span):
        if re.search(r"\.(md|py|json|jsonl|yaml|yml|toml|txt|csv|parquet|png|html|db|lock|sh|bin|safetensors|gguf)$", span):
            return None  # a file name, not a key
        key = None if ":" in span else is_params_key(span, root)
        python = is_python_name(span, root)
        if key or python:
            return None
        if key is False and python is None:
            return f"no params.yaml key {span}"
        if python is False and key is None:
            return f"no Python name {span} in this repository"
        if key is False and python is False:
            return f"neither a params.yaml key nor a Python name: {span}"
    return None


def check_code_names(page: Path, root: Path = ROOT) -> list[Problem]:
    problems = []
    rel_page = page.relative_to(root).as_posix()
    for number, line in prose_lines(page.read_text()):
        for span in CODE_SPAN.findall(line):
            why = check_code_name(span, root)
            if why:
                problems.append(Problem(rel_page, number, f"`{span}`: {why}"))
    return problems


def doc_pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


# ---------------------------------------------------------------------------------------------
# The checks


def test_every_relative_link_reaches_a_file_and_heading():
    problems = [p for page in doc_pages() for p in check_links(page)]
    assert not problems, "broken links:\n" + "\n".join(map(str, problems))


def test_every_code_name_in_backticks_exists():
    problems = [p for page in doc_pages() for p in check_code_names(page)]
    assert not problems, "code names that do not exist:\n" + "\n".join(map(str, problems))


# ---------------------------------------------------------------------------------------------
# The checker can fail


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "params.yaml").write_text(
        "coverage:\n  eps: 0.1\nrewards:\n  models: {}\nserve:\n  users_db: x\nseed: 0\n")
    (tmp_path / "palm_tasks" / "core").mkdir(parents=True)
    (tmp_path / "palm_tasks" / "__init__.py").write_text("")
    (tmp_path / "palm_tasks" / "core" / "__init__.py").write_text("")
    (tmp_path / "palm_tasks" / "core" / "routing.py").write_text(
        "def route(w):\n    pass\n\nclass Router:\n    def go(self):\n        pass\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_one():\n    pass\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## How it works\n")
    return tmp_path


def _problems(repo: Path, text: str) -> list[str]:
    page = repo / "docs" / "page.md"
    page.write_text(text)
    repo_files.cache_clear()
    params_tree.cache_clear()
    _modules.cache_clear()
    return [str(p) for p in check_links(page, repo) + check_code_names(page, repo)]


def test_the_checker_passes_names_that_exist(tiny_repo):
    text = ("See [other](other.md), [its section](other.md#how-it-works), [top](#a-page), "
            "[the code](../palm_tasks/core/routing.py) and [web](https://example.com/x.md).\n"
            "# A page\n`coverage.eps`, `rewards.models.helpful`, `serve.users_db`, `seed`, "
            "`palm_tasks/core/routing.py`, `core/routing.py`, `routing.py`, `tests/test_a.py::test_one`, "
            "`palm_tasks.core.routing.route`, `core.routing.Router.go`, `palm_tasks.core.routing:route`, "
            "`data/pool.json`, `models/members/<key>/`, `mypkg.rewards:politeness`, `pandas.read_csv`, "
            "`search.md`, `core.no_scm` (a DVC setting: core is a package, no_scm no module of it), "
            "`routing.route`, `routing.statement` (a bare module name only confirms), `Router.go`, "
            "`HalfspaceIntersection.add_points`, `train.jsonl`, `coverage.eps: 0.2`, `runner: {kind: dask}`\n"
            "```\n[not a link](missing.md) `palm_tasks/missing.py`\n```\n")
    assert _problems(tiny_repo, text) == []


@pytest.mark.parametrize("text, missing", [
    ("intro\n\nsee [gone](gone.md)\n", "docs/page.md:3: link 'gone.md': no file docs/gone.md"),
    ("[x](other.md#no-such-heading)\n", "no heading #no-such-heading in docs/other.md"),
    ("[x](../../outside.md)\n", "leaves the repository"),
    ("a\n`palm_tasks/gone.py`\n", "docs/page.md:2: `palm_tasks/gone.py`: no file or folder palm_tasks/gone.py"),
    ("`core/gone.py`\n", "no file named core/gone.py"),
    ("`tests/test_a.py::test_two`\n", "no test or function test_two in tests/test_a.py"),
    ("`coverage.epsilon`\n", "no params.yaml key coverage.epsilon"),
    ("`coverage.eps.more`\n", "no params.yaml key coverage.eps.more"),
    ("`coverage.z: 1`\n", "no params.yaml key coverage.z"),
    ("`palm_tasks.core.routing.nothing`\n", "no Python name palm_tasks.core.routing.nothing"),
    ("`core.routing.Router.stop`\n", "no Python name core.routing.Router.stop"),
    ("`palm_tasks.core.routing:nothing`\n", "no Python name palm_tasks.core.routing:nothing"),
    ("`Router.stop`\n", "no Python name Router.stop"),
])
def test_the_checker_names_the_file_the_line_and_the_missing_thing(tiny_repo, text, missing):
    problems = _problems(tiny_repo, text)
    assert len(problems) == 1 and missing in problems[0], problems
