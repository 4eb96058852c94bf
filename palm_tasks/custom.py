"""Your own reward functions and prompts: the project's `custom/` folder (docs/your-own.md).

Reads:  params.yaml `rewards.functions` (MODULE:NAME of Python callables) and `data.prompts_file`.
Checks: before any work (every `palm` command, palm_tasks/stages/__init__.py): each function
        imports, is callable and scores two sample answers (llm.reward_functions.check_functions),
        and the prompts file exists, is a file or directory of .jsonl/.csv/.parquet files, is not
        larger than MAX_PROMPTS_FILE_BYTES, and holds enough prompts (`check_prompts_file`).

Why one folder: dvc.yaml lists `custom` as a dependency of every stage that scores answers or
reads prompts, so a changed reward or prompts file reruns exactly those stages under
`dvc repro` (and `dvc status` shows it). A function from an installed package is part of the
environment, like TRL's version: DVC does not see it, but the job keys do. Either way a
function is versioned by the sha256 of its module's source file and of the custom/ modules it
imports (`function_version`), which goes into every alignment job's key: editing the function
or a helper it uses retrains the jobs it scores, and nothing else.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from pathlib import Path

from palm_tasks.paths import CUSTOM

MAX_PROMPTS_FILE_BYTES = 256 * 2**20  # the pipeline reads at most data.n_train + data.n_eval prompts


def resolve_prompts_file(cfg, root: Path) -> Path:
    """data.prompts_file in the project at `root`, checked (ConfigError names what is wrong)."""
    from palm_tasks.config import ConfigError
    from palm_tasks.llm.prompts import PROMPT_SUFFIXES, prompt_files
    from palm_tasks.tracking import inside_project

    key, shown = "data.prompts_file", cfg.data.prompts_file
    path = inside_project(root, shown, key)
    if (Path(root).resolve() / CUSTOM) not in path.parents:  # a symlink under custom/ pointing elsewhere
        raise ConfigError(f"{key} = {shown!r}: resolves to {path}, outside {CUSTOM}/")
    if not path.exists():
        raise ConfigError(f"{key} = {shown!r}: no such file or directory ({path})")
    files = prompt_files(path)
    if not files:
        raise ConfigError(f"{key} = {shown!r}: a directory with no {', '.join(PROMPT_SUFFIXES)} files")
    for f in files:
        if f.suffix not in PROMPT_SUFFIXES:
            raise ConfigError(f"{key}: {f}: a {f.suffix or 'suffix-less'} file; prompts are read from "
                              f"{', '.join(PROMPT_SUFFIXES)} files")
        if not f.is_file():
            raise ConfigError(f"{key}: {f}: not a regular file")
    size = sum(f.stat().st_size for f in files)
    if size > MAX_PROMPTS_FILE_BYTES:
        raise ConfigError(f"{key} = {shown!r}: {size / 2**30:.2f} GiB of prompt files; at most "
                          f"{MAX_PROMPTS_FILE_BYTES // 2**20} MiB are read (the pipeline uses data.n_train + "
                          "data.n_eval prompts): keep a sample of them")
    return path


def import_function(spec: str, root: Path, trait: str):
    """The callable MODULE:NAME names, imported with the project root first on sys.path (so
    `custom.rewards` is the project's). ConfigError names the trait and what failed."""
    from palm_tasks.config import ConfigError

    module_name, _, name = spec.partition(":")
    key = f"rewards.functions.{trait}"
    root = str(Path(root).resolve())
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)  # this project's custom/ first, even if another project's was imported before
    if module_name.split(".")[0] == CUSTOM:  # imported afresh: its source now, from this project
        for loaded in [m for m in sys.modules if m == CUSTOM or m.startswith(CUSTOM + ".")]:
            del sys.modules[loaded]
        importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 (the user's module: any error in it, even an exit, is theirs)
        raise ConfigError(f"{key} = {spec!r}: module {module_name!r} cannot be imported "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    source = getattr(module, "__file__", None)
    if source is not None:
        where = Path(source).resolve()
        if Path(root) in where.parents and Path(root, CUSTOM) not in where.parents:
            raise ConfigError(f"{key} = {spec!r}: {where} is in the project but not in {CUSTOM}/, which dvc.yaml "
                              f"tracks; move the module into {CUSTOM}/")
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"{key} = {spec!r}: module {module_name!r} has no {name!r}")
    if not callable(fn):
        raise ConfigError(f"{key} = {spec!r}: {name!r} is of type {type(fn).__name__}, not a function")
    return fn


def function_version(fn, spec: str, root: Path) -> str:
    """A version of the function that changes with its source: `fn-<spec>-<sha256[:16]>` over
    its module's file and, for a module in custom/, every custom/ module it imported (a helper
    it calls is part of it). Call right after `import_function`, which imports custom/ afresh,
    so that the custom/ modules loaded are the ones this function pulled in. A module without
    a source file (compiled) is versioned by its name alone."""
    custom = Path(root).resolve() / CUSTOM
    files = set()
    try:
        source = inspect.getsourcefile(inspect.getmodule(fn))
        if source:
            files.add(Path(source).resolve())
    except TypeError:
        pass
    for module in list(sys.modules.values()):
        where = getattr(module, "__file__", None)
        if where and custom in Path(where).resolve().parents:
            files.add(Path(where).resolve())
    h = hashlib.sha256()
    for f in sorted(files):
        try:
            h.update(str(f.relative_to(custom) if custom in f.parents else f.name).encode() + b"\0" + f.read_bytes())
        except OSError:
            continue
    return f"fn-{spec}-{h.hexdigest()[:16] if files else 'nosource'}"


def check_prompts_file(cfg, root: Path) -> None:
    """ConfigError unless data.prompts_file (if set) names prompt files of a size that fits, every
    row of them a prompt, and at least data.n_train + data.n_eval distinct ones: read now, not
    after the base model's conversion."""
    from palm_tasks.config import ConfigError
    from palm_tasks.llm.prompts import PromptFileError, file_sources

    if cfg.data.prompts_file is None:
        return
    try:
        n = len(file_sources(resolve_prompts_file(cfg, root), cfg.data.prompts_column))
    except PromptFileError as exc:
        raise ConfigError(f"data.prompts_file: {exc}") from None
    if n < cfg.data.n_train + cfg.data.n_eval:
        raise ConfigError(f"data.prompts_file = {cfg.data.prompts_file!r}: {n} distinct prompts, fewer than "
                          f"data.n_train + data.n_eval = {cfg.data.n_train + cfg.data.n_eval}")
