"""`palm export vllm`: the command that serves the portfolio with vLLM's OpenAI server.

vLLM batches requests of different LoRA adapters on one GPU; `palm serve` answers one at a time
on one model. The export is the same portfolio with the same names: the base model (the
converted safetensors directory every adapter belongs to) and one LoRA module per member,
`palm-member-<key>`, as `palm serve` lists them in /v1/models. vLLM does not route by weights:
a client asks `palm route --weights W` (or POST /route of `palm serve`) for the member, then
calls vLLM with that member as `model`.

A member is its adapter sampled at the temperature its values were measured at (with the
project sampler's top-k): the export makes that vLLM's default for a request that sets neither
(`--override-generation-config`), as `palm serve` does. One run measures every member at one
temperature (evaluation.temperature), so vLLM's one default for all its LoRA modules fits; a
portfolio written before members recorded it gets no default.
"""

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from palm_tasks.serve.api import MEMBER_PREFIX


@dataclass(frozen=True)
class VllmExport:
    base_model: Path
    tokenizer: Path  # the base model's directory, or the registry's components/tokenizer beside it
    served_model_name: str
    lora_modules: dict[str, Path]  # member name -> adapter directory
    max_lora_rank: int
    host: str
    port: int
    generation: dict | None = None  # vLLM's default sampling: the members' temperature and top-k

    @property
    def argv(self) -> list[str]:
        tokenizer = [] if self.tokenizer == self.base_model else ["--tokenizer", str(self.tokenizer)]
        generation = [] if self.generation is None else ["--override-generation-config",
                                                         json.dumps(self.generation, sort_keys=True)]
        return ["vllm", "serve", str(self.base_model), *tokenizer, "--served-model-name", self.served_model_name,
                "--host", self.host, "--port", str(self.port), *generation, "--enable-lora",
                "--max-loras", str(len(self.lora_modules)), "--max-lora-rank", str(self.max_lora_rank),
                "--lora-modules", *(f"{name}={path}" for name, path in self.lora_modules.items())]

    def script(self) -> str:
        """A shell script that starts vLLM (paths quoted for the shell)."""
        lines = [shlex.quote(a) for a in self.argv]
        body = " \\\n    ".join(lines)
        return ("#!/bin/sh\n# The PALM portfolio on vLLM's OpenAI-compatible server (written by palm export vllm).\n"
                "# Members answer as model=palm-member-<key>; `palm route --weights W` says which one.\n"
                f"exec {body}\n")

    def to_dict(self) -> dict:
        return {"argv": self.argv, "base_model": str(self.base_model), "served_model_name": self.served_model_name,
                "lora_modules": [{"name": n, "path": str(p), "base_model_name": self.served_model_name}
                                 for n, p in self.lora_modules.items()],
                "max_lora_rank": self.max_lora_rank, "generation": self.generation}


def vllm_export(router, host: str = "127.0.0.1", port: int = 8000, served_model_name: str = "palm-base") -> VllmExport:
    """The vLLM command for the router's portfolio: every member's adapter (local, or downloaded
    from the registry) and the base model they belong to."""
    from palm_tasks.llm.models import TOP_K, tokenizer_dir, verify_member

    modules, ranks = {}, []
    for member in router.members:
        adapter = router.adapter_dir(member.key)
        verify_member(adapter, member.key)
        config = json.loads((adapter / "adapter_config.json").read_text())
        ranks.append(int(config["r"]))
        modules[f"{MEMBER_PREFIX}{member.key}"] = Path(adapter).resolve()
    base = Path(router.base_model_path()).resolve()
    # vLLM accepts ranks from a fixed list; the smallest that holds every adapter
    rank = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= max(ranks))
    temperatures = {m.temperature for m in router.members}
    if len(temperatures) > 1:  # vLLM has one default for every module: ask for each per request
        raise ValueError(f"the members were measured at different temperatures ({sorted(map(str, temperatures))}); "
                         "vLLM has one default for all of them")
    generation = None if None in temperatures else {"temperature": temperatures.pop(), "top_k": TOP_K}
    return VllmExport(base, tokenizer_dir(base).resolve(), served_model_name, modules, rank, host, port, generation)
