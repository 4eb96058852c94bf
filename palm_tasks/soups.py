"""Rewarded-Soups candidates: interpolated LoRA adapters of the specialists, evaluated like members.

A soup mixes the d specialists (the members trained for a single trait, w = e_i) with weights
lambda on the simplex: theta = base + sum_i lambda_i DeltaW_i, the weight-space interpolation
of Rewarded Soups. For LoRA, DeltaW_i = s_i B_i A_i (s_i = alpha_i / r_i), and interpolating A
and B separately would not give sum_i lambda_i DeltaW_i (the products mix). So the soup
concatenates the ranks ("cat", as PEFT's add_weighted_adapter calls it):
    A = [lambda_1 s_1 A_1; ...; lambda_d s_d A_d],  B = [B_1, ..., B_d],  alpha = r = sum_i r_i,
whose B A is exactly sum_i lambda_i s_i B_i A_i. Its rank is the sum of the ingredients' ranks.

A soup costs an evaluation, no training. Its value vector is measured on the same eval prompts
with the same seed as the members (align.evaluate), never assumed; the coverage stage offers it
as a candidate that may serve users, but not as an oracle row (theory.md section 5): it is not
optimal for any weight by construction.

A soup is stored like a member under models/soups/<key>/ (adapter/, member.json with
kind = "soup", its ingredients and lambdas, completions.jsonl, checksums.json), written to a
temporary directory and renamed into place; its key is the hash of the ingredient member keys,
the lambdas and the evaluation settings, so a rerun reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from palm_tasks.align import (ADAPTER_DIR, Member, evaluate,
                              find_member, load_member, load_policy, resolve_device, store_member)
from palm_tasks.config import PalmConfig
from palm_tasks.grid import simplex_lattice

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


def specialists(pool: list[Member], d: int) -> list[Member] | None:
    """The pool's member trained for each single trait (w = e_i), in trait order; None if one is missing."""
    found = []
    for i in range(d):
        matches = [m for m in pool if np.allclose(m.weights, np.eye(d)[i], atol=1e-9)]
        if not matches:
            return None
        found.append(matches[0])
    return found


def soup_key(ingredient_keys: list[str], lambdas, cfg: PalmConfig) -> str:
    payload = {"recipe": SOUP_RECIPE, "ingredients": list(ingredient_keys),
               "lambdas": [round(float(x), 9) for x in lambdas],
               "evaluation": cfg.evaluation.model_dump(), "seed": cfg.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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


# ------------------------------------------------------------------------------- the soups


def find_soup(soups_dir: Path, key: str) -> Member | None:
    """The finished soup with this key, or None; a damaged one is removed so it is rebuilt."""
    return find_member(soups_dir, key, redo="the soup will be rebuilt")


def build_soup(cfg: PalmConfig, base_path: Path, ingredients: list[Member], lambdas, rewards,
               eval_prompts: list[str], soups_dir: Path) -> Member:
    """Mix, evaluate and store one soup atomically; returns it as read back from disk."""
    lambdas = [float(x) for x in lambdas]
    key = soup_key([m.key for m in ingredients], lambdas, cfg)
    final, tmp = Path(soups_dir) / key, Path(soups_dir) / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.time()
    try:
        mix_adapters([m.adapter for m in ingredients], lambdas, tmp / ADAPTER_DIR)
        device = resolve_device(cfg.device)
        policy, tokenizer = load_policy(base_path, tmp / ADAPTER_DIR, device)
        values, se, prompts, completions, scores = evaluate(policy, tokenizer, rewards, eval_prompts, cfg)
        weights = np.sum([lam * m.weights for lam, m in zip(lambdas, ingredients)], axis=0)
        info = {
            "key": key,
            "kind": "soup",
            "recipe": SOUP_RECIPE,
            "ingredients": [m.key for m in ingredients],
            "lambdas": lambdas,
            "traits": list(cfg.traits),
            # sum_i lambda_i w_i: where the soup is meant to sit, not a weight it was trained for
            "weights": weights.tolist(),
            "values": values.tolist(),
            "std_errors": se.tolist(),
            "n_eval": len(completions),
            "evaluation": cfg.evaluation.model_dump(),
            "seed": cfg.seed,
            "device": device,
            "total_seconds": round(time.time() - started, 2),
            "mlflow_run_id": None,  # no training run
        }
        store_member(tmp, final, info, prompts, completions, scores)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_member(final)


def make_soups(cfg: PalmConfig, base_path: Path, pool: list[Member], rewards, eval_prompts: list[str],
               soups_dir: Path, say=print) -> dict:
    """The soups params.yaml asks for (soups section), reused when finished earlier.

    Returns {"soups": [Member], "ingredients": [keys], "built": n, "reused": n, "skipped": reason|None}.
    """
    out = {"soups": [], "ingredients": [], "built": 0, "reused": 0, "skipped": None}
    s = cfg.soups
    if not s.enabled or s.max_soups == 0:
        out["skipped"] = "soups.enabled is false or soups.max_soups is 0"
        return out
    ingredients = specialists(pool, cfg.d)
    if ingredients is None:
        out["skipped"] = "the pool lacks a specialist (w = e_i) for some trait: soups mix the d specialists"
        return out
    out["ingredients"] = [m.key for m in ingredients]
    for stale in Path(soups_dir).glob(".*.tmp-*"):  # half-written soups of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    for lambdas in soup_lambdas(cfg.d, s.divisions, s.max_soups):
        key = soup_key(out["ingredients"], lambdas, cfg)
        soup = find_soup(soups_dir, key)
        if soup is None:
            soup = build_soup(cfg, base_path, ingredients, lambdas, rewards, eval_prompts, soups_dir)
            out["built"] += 1
            say(f"soups: {key} lambda={_fmt(lambdas)} value {_fmt(soup.values)} ± {_fmt(soup.std_errors)}")
        else:
            out["reused"] += 1
            say(f"soups: {key} lambda={_fmt(lambdas)} finished earlier, reused")
        out["soups"].append(soup)
    return out


def _fmt(x) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in x) + ")"
