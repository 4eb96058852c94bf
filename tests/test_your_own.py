"""Your own reward functions, prompts and base model (docs/your-own.md): the worked example in
custom/ through the real pipeline on the tiny model, and what each piece promises."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, command_env, make_project, run_command
from palm_tasks.config import ConfigError, parse_config
from palm_tasks.llm.prompts import PromptFileError, file_sources, prepare_prompts
from palm_tasks.llm.rewards import project_rewards, score_all

EXAMPLE = {"traits": ["politeness", "brevity"],
           "rewards": {"functions": {"politeness": "custom.rewards:politeness"}},
           "data": {"prompts_file": "custom/prompts.jsonl"}}


def example_project(dest: Path, tiny_model: Path) -> Path:
    """The tiny project with the worked example's settings (docs/your-own.md). The tiny model's
    answers are noise measured on 8 prompts: at the default (0.1, 0.02) its corners stay open
    at the cap (measured: max_delta 0.87), so the test asks a tolerance they can be decided at,
    delta 0.95; SmolLM2 certifies the example at the defaults (docs/your-own.md)."""
    root = make_project(dest, tiny_model)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["coverage"]["delta"] = 0.95
    params["traits"] = EXAMPLE["traits"]
    params["rewards"].update(EXAMPLE["rewards"])
    params["data"].update(EXAMPLE["data"])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


# --- the function trait -----------------------------------------------------------------------------


def test_a_function_trait_scores_answers_and_a_non_answer_scores_0():
    cfg = parse_config(EXAMPLE)
    politeness, brevity = project_rewards(cfg, ROOT)
    prompts = ["How do I make tea?"] * 3
    answers = ["Boil water, please, and thank you for asking.", "Boil water and steep the leaves.", "thanks"]
    scores = score_all([politeness, brevity], prompts, answers)
    assert scores[:, 0].tolist() == [1.0, 0.0, 0.0]  # "thanks" alone is a degenerate answer: 0 on every trait
    assert politeness.version.startswith("fn-custom.rewards:politeness-") and politeness.version.endswith("+valid-v1")


def _own_module(root: Path, body: str) -> None:
    (root / "custom").mkdir(parents=True, exist_ok=True)
    (root / "custom" / "__init__.py").write_text("")
    (root / "custom" / "rewards.py").write_text(body)


def test_editing_the_function_changes_its_version_and_no_other(tmp_path):
    cfg = parse_config(EXAMPLE)
    _own_module(tmp_path, "def politeness(prompts, completions):\n    return [1.0 for _ in completions]\n")
    before = [r.version for r in project_rewards(cfg, tmp_path)]
    _own_module(tmp_path, "def politeness(prompts, completions):\n    return [0.5 for _ in completions]\n")
    after = [r.version for r in project_rewards(cfg, tmp_path)]
    assert after[0] != before[0] and after[1] == before[1]
    # the module is read afresh: the edited function scores
    (politeness, _) = project_rewards(cfg, tmp_path)
    assert politeness(["q"], ["An answer of some words."]).tolist() == [0.5]


def test_a_helper_the_function_imports_is_part_of_its_version_and_an_unrelated_module_is_not(tmp_path):
    cfg = parse_config(EXAMPLE)
    _own_module(tmp_path, "from custom.words import POLITE\n\ndef politeness(prompts, completions):\n"
                          "    return [float(any(w in a for w in POLITE)) for a in completions]\n")
    (tmp_path / "custom" / "words.py").write_text("POLITE = ['please']\n")
    (tmp_path / "custom" / "other.py").write_text("X = 1\n")
    first = project_rewards(cfg, tmp_path)[0].version
    (tmp_path / "custom" / "other.py").write_text("X = 2\n")
    assert project_rewards(cfg, tmp_path)[0].version == first
    (tmp_path / "custom" / "words.py").write_text("POLITE = ['please', 'thanks']\n")
    assert project_rewards(cfg, tmp_path)[0].version != first


def test_a_function_from_an_installed_package_is_versioned_by_its_source(tmp_path, monkeypatch):
    """A module outside the project (as pip installs one) is allowed; DVC does not see it, the
    job keys do: its version follows its file."""
    site = tmp_path / "site-packages"
    (site / "palm_extra_rewards").mkdir(parents=True)
    module = site / "palm_extra_rewards" / "__init__.py"
    module.write_text("def score(prompts, completions):\n    return [0.25 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(site))
    project = tmp_path / "project"
    project.mkdir()
    cfg = parse_config({"traits": ["mine", "brevity"], "rewards": {"functions": {"mine": "palm_extra_rewards:score"}}})
    mine, _ = project_rewards(cfg, project)
    assert mine(["q"], ["An answer of some words."]).tolist() == [0.25]
    module.write_text("def score(prompts, completions):\n    return [0.75 for _ in completions]\n")
    sys.modules.pop("palm_extra_rewards")
    assert project_rewards(cfg, project)[0].version != mine.version


@pytest.mark.parametrize("normalize, values, expected", [
    ({"normalize": "clip"}, [-1.0, 0.5, 3.0], [0.0, 0.5, 1.0]),
    ({"normalize": "minmax", "lo": -10, "hi": 10}, [-10.0, 0.0, 20.0], [0.0, 0.5, 1.0]),
])
def test_values_outside_0_1_are_normalized_as_configured(tmp_path, normalize, values, expected):
    _own_module(tmp_path, f"def score(prompts, completions):\n    return {values}[:len(completions)]\n")
    cfg = parse_config({"traits": ["mine", "brevity"],
                        "rewards": {"functions": {"mine": {"function": "custom.rewards:score", **normalize}}}})
    mine, _ = project_rewards(cfg, tmp_path)
    answers = ["An answer of five words.", "Another answer of five words.", "A third answer, five words."]
    assert mine(["q"] * 3, answers).tolist() == expected


# --- prompts files -----------------------------------------------------------------------------------


def test_jsonl_csv_parquet_and_a_directory_give_the_same_prompts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [json.loads(line)["prompt"] for line in (ROOT / "custom" / "prompts.jsonl").read_text().splitlines()]
    folder = tmp_path / "custom" / "many"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts[:20]))
    with (folder / "b.csv").open("w", newline="") as f:
        import csv

        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows([i, p] for i, p in enumerate(prompts[20:40]))
    pq.write_table(pa.table({"text": prompts[40:]}), folder / "c.parquet")
    pairs = file_sources(folder, "text")
    assert [p for _, p in pairs] == prompts
    assert {s for s, _ in pairs} == {"file/a.jsonl", "file/b.csv", "file/c.parquet"}
    first = prepare_prompts("assistant", tmp_path / "split1", 16, 8, 0, folder, "text")
    prepare_prompts("assistant", tmp_path / "split2", 16, 8, 0, folder, "text")
    assert first["pool_size"] == 60 and first["prompts_file"] == str(folder)
    for name in ("train.jsonl", "eval.jsonl"):  # a fixed seed: the same split every time
        assert (tmp_path / "split1" / name).read_bytes() == (tmp_path / "split2" / name).read_bytes()
    train = {json.loads(x)["prompt"] for x in (tmp_path / "split1" / "train.jsonl").read_text().splitlines()}
    evaluation = {json.loads(x)["prompt"] for x in (tmp_path / "split1" / "eval.jsonl").read_text().splitlines()}
    assert len(train) == 16 and len(evaluation) == 8 and not train & evaluation


def test_a_bad_row_is_named_by_file_and_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": 7}\n')
    with pytest.raises(PromptFileError, match=rf"{path}: row 2: prompt is int, not text"):
        file_sources(path)


# --- base models of your own ---------------------------------------------------------------------------


def test_a_model_without_tokenizer_or_chat_template_is_refused_naming_what_is_missing(tmp_path, tiny_model):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="has no tokenizer"):
        parse_config({"base_model": str(no_tokenizer)})
    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_model, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in no_template.glob("chat_template.*"):
        extra.unlink()
    with pytest.raises(ConfigError, match="has no chat template"):
        parse_config({"base_model": str(no_template)})
    assert parse_config({"base_model": str(tiny_model)}).base_model == str(tiny_model)


def test_a_model_too_big_for_memory_is_refused_with_the_size_it_needs(tmp_path, tiny_model):
    from palm_tasks.base_check import machine_memory

    big = tmp_path / "big"
    shutil.copytree(tiny_model, big)
    for w in big.glob("*.safetensors"):
        w.unlink()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [70_000_000_000], "data_offsets": [0, 0]}}).encode()
    (big / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)  # the header alone
    with pytest.raises(ConfigError) as err:
        parse_config({"base_model": str(big)})
    need = 4 * 70e9 * 3 / 2**30
    assert f"{need:.1f} GiB" in str(err.value) and f"{machine_memory() / 2**30:.1f} GiB" in str(err.value)


def test_a_gguf_base_model_is_converted_once(tmp_path):
    """The packaged SmolLM2 GGUF named as a file of one's own: checked (chat template, memory),
    then converted to fp32 safetensors like `smollm2`, and reused on the next call."""
    from palm_tasks.llm.base_model import prepare_base_model, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    cfg = parse_config({"base_model": str(gguf)})
    out = tmp_path / "base"
    info = prepare_base_model(cfg.base_model, out)
    assert info["name"] == gguf.stem and info["path"] is None and (out / "model.safetensors").is_file()
    stamp = (out / "base.json").stat().st_mtime_ns
    assert prepare_base_model(cfg.base_model, out) == info and (out / "base.json").stat().st_mtime_ns == stamp


# --- the worked example, end to end -------------------------------------------------------------------------


def test_the_worked_example_runs_registers_serves_and_an_edit_retrains_only_its_jobs(tmp_path, tiny_model,
                                                                                     prefect_harness):
    """docs/your-own.md on the tiny model: `palm run` with the politeness function and the
    prompts file to a certified portfolio, registered in MLflow and served by `palm serve`;
    then the function is edited: the next run trains every job again (each is scored by it)
    and scores the base's answers again, and nothing else (the base model, the prompt split,
    the base's answers), and `dvc status` is clean."""
    from serving import http_request, start_palm_serve

    root = example_project(tmp_path / "project", tiny_model)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"]):
        run_command(root, *cmd)
    palm = [sys.executable, "-m", "flows.cli", "run", "--root", str(root), "--params", str(root / "params.yaml")]
    run_command(root, *palm)

    prompts = {json.loads(x)["prompt"] for x in (root / "custom" / "prompts.jsonl").read_text().splitlines()}
    split = {n: (root / "data" / "prompts" / n).read_bytes() for n in ("train.jsonl", "eval.jsonl")}
    used = {json.loads(x)["prompt"] for b in split.values() for x in b.decode().splitlines()}
    assert used <= prompts and len(used) == 24  # data.n_train + data.n_eval of the tiny settings
    portfolio = json.loads((root / "portfolio.json").read_text())
    assert portfolio["traits"] == ["politeness", "brevity"] and portfolio["certificate"]["certified"] is True
    register = json.loads((root / "metrics" / "register.details.json").read_text())
    assert register["portfolio_version"]
    align = json.loads((root / "metrics" / "align.json").read_text())
    first_keys = {p.name for p in (root / "models" / "members").iterdir() if p.is_dir()}
    assert align["trained"] >= 1 and len(first_keys) == align["trained"]

    process, url = start_palm_serve(root)
    try:
        address = tuple(url.removeprefix("http://").split(":"))
        status, body = http_request((address[0], int(address[1])), "POST", "/v1/chat/completions", {
            "model": "palm", "messages": [{"role": "user", "content": "How do I make tea?"}], "max_tokens": 8,
            "palm": {"weights": {"politeness": 0.7, "brevity": 0.3}}})
        assert status == 200, body
        assert body["model"].startswith("palm-member-") and body["choices"][0]["message"]["content"] is not None
    finally:
        process.terminate()
        process.wait(timeout=60)

    base_info = (root / "models" / "base" / "base.json").stat().st_mtime_ns
    pool = json.loads((root / "data" / "samples" / "eval.json").read_text())
    source = root / "custom" / "rewards.py"
    edited = source.read_text().replace("kindly|", "kindly|cheers|")
    assert edited != source.read_text()
    source.write_text(edited)
    run_command(root, *palm)
    again = json.loads((root / "metrics" / "align.json").read_text())
    keys = {p.name for p in (root / "models" / "members").iterdir() if p.is_dir()}
    assert again["reused"] == 0 and again["trained"] >= 1 and len(keys - first_keys) == again["trained"]
    assert first_keys <= keys  # the first run's jobs are kept (reused if the function is changed back)
    assert {n: (root / "data" / "prompts" / n).read_bytes() for n in split} == split
    assert (root / "models" / "base" / "base.json").stat().st_mtime_ns == base_info
    rescored = json.loads((root / "data" / "samples" / "eval.json").read_text())  # scored again, not sampled
    assert rescored["completions"] == pool["completions"] and rescored["reward_versions"] != pool["reward_versions"]
    assert not (root / "models" / "rewards" / "humor").exists()  # no trait needs the humor classifier
    # byte-code caches, as Python writes them where PYTHONDONTWRITEBYTECODE is unset, are no change
    for folder in (root / "custom", root / "palm_tasks" / "core"):
        (folder / "__pycache__").mkdir(exist_ok=True)
        (folder / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\x00" * 16)
    status = subprocess.run(["dvc", "status"], cwd=root, capture_output=True, text=True, timeout=300,
                            env=command_env())
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    versions = json.loads((root / "metrics" / "rewards.details.json").read_text())["reward_versions"]
    assert versions["politeness"].startswith("fn-custom.rewards:politeness-")
    assert np.isfinite(json.loads((root / "metrics" / "coverage.json").read_text())["max_eps"])
