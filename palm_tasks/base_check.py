"""What a base model of your own must be, checked when params.yaml is read (docs/your-own.md).

`base_model` is `smollm2` (the packaged SmolLM2-135M-Instruct), a local Hugging Face causal-LM
directory, or a GGUF file. `check_base_model` refuses, in one line with what is missing or the
size it would need, before any work starts:

- a directory without config.json, without *.safetensors weights (pickles are never loaded),
  or without a tokenizer (tokenizer.json, tokenizer.model, or vocab.json with merges.txt);
- a model without a chat template (tokenizer_config.json `chat_template`, chat_template.jinja
  or chat_template.json; in a GGUF file, `tokenizer.chat_template`): every prompt is put to
  the model as a chat, and a template guessed for it would make its answers meaningless;
- a model too big for this machine's memory: the pipeline holds the weights in fp32 (a GGUF
  file is dequantized), and about three copies at once (the model a job trains, the one it
  samples or evaluates with, the copy the register stage saves), so it needs
  4 bytes x parameters x MEMORY_COPIES.

Only headers are read: safetensors' JSON header and GGUF's tensor table, never the weights.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

MEMORY_COPIES = 3
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header is a few hundred kB; more is no model
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
GGUF_MAGIC = b"GGUF"


def safetensors_parameters(path: Path) -> int:
    """Number of parameters in a safetensors file, from its header."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: a safetensors header of {size:,} bytes; not a model file")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: the safetensors header is not JSON; the file is damaged") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is no table of tensors; the file is damaged")
    return sum(math.prod(t.get("shape") or [1]) for name, t in header.items()
               if name != "__metadata__" and isinstance(t, dict))


def machine_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def check_memory(parameters: int, where: str) -> None:
    need, have = 4 * parameters * MEMORY_COPIES, machine_memory()
    if need > have:
        raise ValueError(f"{where}: {parameters / 1e9:.2f} B parameters need about {need / 2**30:.1f} GiB "
                         f"(fp32 weights, {MEMORY_COPIES} copies at once); this machine has {have / 2**30:.1f} GiB")


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise ValueError(f"{config}: not a JSON object; the tokenizer's configuration is damaged") from None


def check_model_dir(model_dir: Path) -> None:
    """ValueError naming what a local causal-LM directory lacks (see the module docstring)."""
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{model_dir} has no *.safetensors weights (pickled weights are never loaded)")
    if not any(all((model_dir / name).is_file() for name in names) for names in TOKENIZER_FILES):
        raise ValueError(f"{model_dir} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json with "
                         "merges.txt): save the model's tokenizer beside its weights (tokenizer.save_pretrained)")
    if not _has_chat_template(model_dir):
        raise ValueError(f"{model_dir} has no chat template (tokenizer_config.json chat_template or "
                         "chat_template.jinja): PALM puts every prompt to the model as a chat; use an instruct "
                         "model, or set tokenizer.chat_template and save the tokenizer")
    check_memory(sum(safetensors_parameters(w) for w in weights), str(model_dir))


def check_gguf(path: Path) -> None:
    """ValueError unless `path` is a GGUF file with a chat template that fits in memory."""
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (its first bytes are not 'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 (gguf raises ValueError, IndexError, struct.error on damage)
        raise ValueError(f"{path}: a damaged GGUF file ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") \
            from None
    if "tokenizer.chat_template" not in reader.fields:
        raise ValueError(f"{path}: the GGUF file has no tokenizer.chat_template: PALM puts every prompt to the "
                         "model as a chat; use an instruct model's GGUF")
    check_memory(sum(int(t.n_elements) for t in reader.tensors), str(path))


def check_base_model(base_model: str) -> None:
    """ValueError unless `base_model` is 'smollm2', a usable model directory or GGUF file."""
    if base_model == "smollm2":
        return
    path = Path(base_model).expanduser()
    try:
        if path.is_file() and path.suffix == ".gguf":
            check_gguf(path)
        elif path.is_dir():
            check_model_dir(path)
        else:
            raise ValueError(f"not 'smollm2', a model directory or a .gguf file ({path} does not exist or is "
                             "another kind of file)")
    except OSError as exc:  # a name too long, a directory we may not read
        raise ValueError(f"{path} cannot be read ({exc.strerror or exc})") from None
