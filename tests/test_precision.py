"""Precision (params.yaml `precision`, docs/precision.md): bf16 only where the device computes it
natively, the LoRA weights trained in fp32 either way, and the precision in every key that names
answers (job, evaluation chunks, sample pool) without changing the keys of fp32 work."""
import dataclasses

import pytest
import torch

from palm_tasks.jobs import JobSpec
from palm_tasks.llm import models
from palm_tasks.llm.models import generate, load_base, load_tokenizer, precision_of, resolve_precision


def test_bf16_on_a_cpu_is_taken_only_by_name_and_refused_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(RuntimeError, match=r"precision: bf16 .* avx512_bf16"):
        resolve_precision("bf16", "cpu")
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "fp32"  # on a CPU bf16 is asked for by name
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"


def test_this_machines_cpu_flags_are_read():
    flags = open("/proc/cpuinfo").read().split()
    assert models.cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_a_cpu_bf16_model_keeps_fp32_weights_and_samples_under_autocast(tiny_model):
    fp32, bf16 = load_base(tiny_model, "cpu"), load_base(tiny_model, "cpu", precision="bf16")
    tokenizer = load_tokenizer(tiny_model)
    assert {p.dtype for p in bf16.parameters()} == {torch.float32}  # trained in fp32 either way
    assert (precision_of(fp32), precision_of(bf16)) == ("fp32", "bf16")
    seen = []
    hook = bf16.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    answers = generate(bf16, tokenizer, ["Tell me a joke"] * 3, 4, 1.0, 8, 0)
    hook.remove()
    assert len(answers) == 3 and seen and set(seen) == {torch.bfloat16}
    seen.clear()
    hook = fp32.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    generate(fp32, tokenizer, ["Tell me a joke"] * 3, 4, 1.0, 8, 0)
    hook.remove()
    assert set(seen) == {torch.float32}
    assert models.common_args("cpu", 0, "bf16")["bf16"] and not models.common_args("cpu", 0, "fp32")["bf16"]


def test_precision_enters_the_job_key_without_changing_an_fp32_key():
    spec = JobSpec(traits=("a", "b"), weights=(0.5, 0.5), base_model_sha256="0" * 64, reward_versions=("x", "y"),
                   data_sha256="1" * 64, training={"rounds": 3})
    import hashlib
    import json

    payload = dataclasses.asdict(spec)
    del payload["precision"]  # the payload of a job trained before precision was a setting
    del payload["evidence_sha256"]  # and before rsft rounds stopped once done
    payload["weights"] = [0.5, 0.5]
    before = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert spec.key == before
    assert dataclasses.replace(spec, precision="bf16").key != before


def test_sft_under_bf16_trains_the_fp32_lora_weights(tiny_model, tmp_path):
    # TRL's bf16 with use_cpu: the trainer's autocast; the adapter stays fp32 and moves
    from palm_tasks.config import TrainingConfig
    from palm_tasks.llm.rsft import lora_model, sft

    t = TrainingConfig(epochs=1, batch_size=2)
    model = lora_model(tiny_model, t, "cpu", 0, precision="bf16")
    tokenizer = load_tokenizer(tiny_model)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    loss = sft(model, tokenizer, [("Tell me a joke", "A short one."), ("Hi", "Hello there.")], t, "cpu", 0,
               tmp_path / "trainer")
    assert loss is not None and loss > 0
    after = dict(model.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in lora)
    assert any(not torch.equal(after[n].detach(), lora[n]) for n in lora)
