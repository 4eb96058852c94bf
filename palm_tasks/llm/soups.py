"""Rewarded-Soups mixing: interpolated LoRA adapters of the specialists (docs/theory.md 5).

A soup mixes the d specialists (the policies trained for a single trait, w = e_i) with weights
lambda on the simplex: theta = base + sum_i lambda_i DeltaW_i, the weight-space interpolation
of Rewarded Soups. For LoRA, DeltaW_i = s_i B_i A_i (s_i = alpha_i / r_i), and interpolating A
and B separately would not give sum_i lambda_i DeltaW_i (the products mix). So the soup
concatenates the ranks ("cat", as PEFT's add_weighted_adapter calls it):
    A = [lambda_1 s_1 A_1; ...; lambda_d s_d A_d],  B = [B_1, ..., B_d],  alpha = r = sum_i r_i,
whose B A is exactly sum_i lambda_i s_i B_i A_i. Its rank is the sum of the ingredients' ranks.

A soup costs an evaluation, no training; its value vector is measured like a trained policy's
(a soup job, palm_tasks.jobs), never assumed, and it is never an oracle row: it is not optimal
for any weight by construction.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from palm_tasks.core.simplex import simplex_lattice
from palm_tasks.schema import Policy

SOUP_RECIPE = "soup-lora-cat-v1"  # bump when the way adapters are mixed changes
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def soup_lambdas(d: int, divisions: int, max_soups: int) -> np.ndarray:
    """Mixing weights: the simplex lattice of step 1/divisions without its vertices (those are
    the specialists themselves), the most mixed (lowest sum of squares) first, at most max_soups."""
    lattice = simplex_lattice(d, divisions)
    mixed = lattice[lattice.max(axis=1) < 1 - 1e-9]
    order = sorted(range(len(mixed)), key=lambda i: ((mixed[i] ** 2).sum().round(9), tuple(-mixed[i])))
    return mixed[order][:max_soups]


def specialists(pool: list[Policy], d: int) -> list[Policy] | None:
    """The pool's member trained for each single trait (w = e_i), in trait order; None if one is missing."""
    found = []
    for i in range(d):
        matches = [m for m in pool if np.allclose(m.w, np.eye(d)[i], atol=1e-9)]
        if not matches:
            return None
        found.append(matches[0])
    return found


# ------------------------------------------------------------------------------ the adapter


def mix_adapters(adapter_dirs: list[Path], lambdas, out_dir: Path) -> None:
    """Write the LoRA adapter whose DeltaW is sum_i lambdas[i] DeltaW_i (module docstring)."""
    import torch
    from safetensors.torch import load_file, save_file

    configs = [json.loads((Path(a) / ADAPTER_CONFIG).read_text()) for a in adapter_dirs]
    first = configs[0]
    for a, c in zip(adapter_dirs, configs):
        if c.get("peft_type") != "LORA" or c.get("use_dora") or c.get("rank_pattern") or c.get("alpha_pattern"):
            raise ValueError(f"soup ingredient {a}: only plain LoRA adapters can be mixed "
                             "(no DoRA, rank_pattern or alpha_pattern)")
        for field in ("base_model_name_or_path", "target_modules", "task_type"):
            if _canonical(c.get(field)) != _canonical(first.get(field)):
                raise ValueError(f"soup ingredients differ in {field}: {c.get(field)!r} in {a} "
                                 f"vs {first.get(field)!r} in {adapter_dirs[0]}")
    tensors = [load_file(str(Path(a) / ADAPTER_WEIGHTS)) for a in adapter_dirs]
    names = sorted(tensors[0])
    for a, t in zip(adapter_dirs, tensors):
        if sorted(t) != names:
            raise ValueError(f"soup ingredient {a}: its adapter has other tensors than {adapter_dirs[0]}")
    scales = [lam * (c["lora_alpha"] / (np.sqrt(c["r"]) if c.get("use_rslora") else c["r"]))
              for lam, c in zip(lambdas, configs)]
    mixed = {}
    for name in names:
        parts = [t[name].float() for t in tensors]
        if ".lora_A." in name:  # (r_i, in): rows scaled, ranks stacked
            mixed[name] = torch.cat([s * p for s, p in zip(scales, parts)], dim=0)
        elif ".lora_B." in name:  # (out, r_i)
            mixed[name] = torch.cat(parts, dim=1)
        else:
            raise ValueError(f"soup ingredient tensor {name!r} is neither lora_A nor lora_B: cannot mix it")
        mixed[name] = mixed[name].to(tensors[0][name].dtype).contiguous()
    rank = int(sum(c["r"] for c in configs))
    config = {**first, "r": rank, "lora_alpha": rank, "use_rslora": False, "lora_dropout": 0.0}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(mixed, str(out_dir / ADAPTER_WEIGHTS))
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def _canonical(value):
    return sorted(value) if isinstance(value, list) else value


def lora_delta(adapter_dir: Path) -> dict[str, np.ndarray]:
    """DeltaW = scale B A of every adapted module (float64), for checks and tests."""
    from safetensors.numpy import load_file

    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    scale = config["lora_alpha"] / (np.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    t = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    return {name.replace(".lora_A.", "."): scale * t[name.replace(".lora_A.", ".lora_B.")].astype(np.float64)
            @ t[name].astype(np.float64) for name in t if ".lora_A." in name}
