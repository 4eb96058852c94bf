"""What each alignment job cost, phase by phase, and why its work stopped (docs/timings.md).

Reads what the jobs already record: a trained policy's member.json (rsft's rounds, each with its
sampling, SFT and round-test seconds and tokens, and whether the test stopped the job) and its
score chunks (each with the seconds and tokens its answers took). The align stage writes one row
per training to metrics/align.details.json (`cost`) and the phase totals to metrics/align.json
(`seconds`, `tokens`: tokens generated while sampling, testing rounds and evaluating);
`palm run` prints them with each stage's wall time (report/console.print_cost).
"""

from __future__ import annotations

from pathlib import Path

from palm_tasks import scores
from palm_tasks.jobs import CorruptPolicyError, load_policy

PHASES = ("sampling", "sft", "round_tests", "evaluation")


def job_cost(path: Path, source: str = "") -> dict:
    """One trained policy's row: key, weights, source, rounds run (of the cap), what ended them,
    seconds per phase (evaluation: every chunk measured of it, None if a chunk has no time),
    prompts measured. A damaged policy gives a row with its key only."""
    path = Path(path)
    try:
        policy = load_policy(path, verify=False)
    except CorruptPolicyError:
        return {"key": path.name, "source": source}
    training = policy.training or {}
    history = training.get("history") or []
    eval_key = training.get("eval_key", "")
    chunks = scores.read_chunks([path / scores.EVALUATIONS / eval_key], eval_key) if eval_key else []
    times = [c.seconds for c in chunks]
    chunk_tokens = [c.tokens for c in chunks]
    cap = int((training.get("job") or {}).get("training", {}).get("rounds", len(history)))
    if history and history[-1].get("stopped"):
        ended = f"not short of best-of-N after round {history[-1]['round']}"
    else:
        ended = "the round cap" if history else ""
    return {"key": policy.key, "weights": [round(float(x), 4) for x in policy.weights], "source": source,
            "rounds": len(history), "of": cap if history else 0, "ended": ended,
            "seconds": {"sampling": round(sum(h.get("sample_seconds", 0.0) for h in history), 1),
                        "sft": round(sum(h.get("sft_seconds", 0.0) for h in history), 1),
                        "round_tests": round(sum(h.get("look_seconds", 0.0) for h in history), 1),
                        "evaluation": round(sum(times), 1) if times and None not in times else None},
            "tokens": {"sampling": _sum_known([h.get("sample_tokens") for h in history]),
                       "round_tests": _sum_known([h.get("look_tokens") for h in history if "look_value" in h]),
                       "evaluation": _sum_known(chunk_tokens) if chunks else None},
            "prompts": sum(len(c.prompts) for c in chunks) // max(chunks[0].answers_per_prompt, 1) if chunks else 0}


def _sum_known(values: list) -> int | None:
    """The sum, or None when a part was recorded before its tokens were counted."""
    return None if None in values else int(sum(values))


def totals(rows: list[dict], what: str = "seconds") -> dict:
    """Seconds (or tokens) per phase over the rows (a phase with an unknown row's figure: None)."""
    out = {}
    for phase in PHASES:
        values = [r.get(what, {}).get(phase) for r in rows if what in r and phase in r[what]]
        out[phase] = None if None in values else round(sum(values), 1) if what == "seconds" else int(sum(values))
    return out
