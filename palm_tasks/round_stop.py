"""When an rsft job has done its work: the paired test after each round (docs/oracle.md).

An rsft job trains for w . r in up to `training.rounds` rounds. After every round but the last,
the policy answers the last `evaluation.min_prompts` held-out prompts of the shared evaluation
order (within the cap), and its per-prompt w . r is paired with best-of-N's answer to the same
prompt from the base's sample pool (the evidence at w, docs/theory.md section 8). The job goes on
only while the row is *short* of the evidence: while the upper end of the paired difference's
interval (core.confidence.mean_interval, two-sided, its error `training.stop_alpha` split over
the job's rounds - 1 looks) is below 0. So a job stops once its policy is not shown short at its
own weight, which is what the search's beaten-row test asks of a row (core.paired.beaten), and a
row that reached the evidence after one or two rounds is not trained a third time.

Why the last prompts and draws of their own (seed + 100000 + round): the certificate reads a
policy's prompts from the first on, and the cap's last ones only where a decision goes that far;
answers sampled for the look are never stored as the policy's scores, so a round chosen because
it looked good on these prompts is not certified on the same draws.

Reads the sample pool (data/samples/eval.json); writes nothing. The job key names the pool's
sha256 (jobs.JobSpec.evidence_sha256), since the rounds a job trains depend on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from palm_tasks.config import PalmConfig
from palm_tasks.core.confidence import Looks, mean_interval
from palm_tasks.log import say
from palm_tasks.schema import SamplePool

LOOK_SEED = 100_000  # the looks' draws: apart from every evaluation chunk's seed + index


@dataclass(frozen=True)
class RoundStop:
    """The test after each rsft round: prompts, best-of-N's w . r on each, the weights, the error
    of one look, and what the answers are sampled with (rewards, evaluation settings, seed)."""
    prompts: list
    evidence: np.ndarray
    weights: np.ndarray
    alpha: float
    rewards: tuple
    evaluation: object
    seed: int
    label: str = ""

    def __call__(self, model, tokenizer, round_: int) -> dict:
        """The look after `round_`: {look_value, look_evidence, look_lower, look_upper,
        look_seconds, look_tokens, stop} (stop: the policy is not shown short of the evidence)."""
        from palm_tasks.llm.value import answer_chunk

        started = time.time()
        answers = answer_chunk(model, tokenizer, list(self.rewards), self.prompts, self.evaluation,
                               self.seed + LOOK_SEED + round_)
        k = self.evaluation.samples_per_prompt
        own = answers.rewards.reshape(len(self.prompts), k, -1).mean(axis=1) @ self.weights
        diff = own - self.evidence
        _, lower, upper, _ = mean_interval(diff[None], self.alpha, Looks(len(diff), len(diff)), -1.0, 1.0)
        stop = bool(upper[0] >= 0.0)
        look = {"look_value": float(own.mean()), "look_evidence": float(self.evidence.mean()),
                "look_lower": float(lower[0]), "look_upper": float(upper[0]),
                "look_seconds": round(time.time() - started, 2), "look_tokens": answers.tokens, "stop": stop}
        say(f"  {self.label} after round {round_}: w.r {own.mean():.3f} against best-of-N {self.evidence.mean():.3f} "
            f"on {len(diff)} held-out prompts, difference in [{lower[0]:+.3f}, {upper[0]:+.3f}]: "
            + ("not short of the evidence, no more rounds" if stop else "short, another round"))
        return look


def look_prompts(cfg: PalmConfig, pool: SamplePool, eval_prompts: list[str]) -> slice | None:
    """Where in the evaluation order an rsft job of params.yaml is tested after its rounds (the
    last evaluation.min_prompts within the cap), or None where no round is looked at: another
    method, one round, training.stop_alpha 0, or a pool not made on these prompts."""
    t, ev = cfg.training, cfg.evaluation
    if t.method != "rsft" or t.rounds < 2 or t.stop_alpha <= 0:
        return None
    cap = min(ev.n_prompts, len(eval_prompts))
    n = min(ev.first_prompts, cap)
    if n < 2 or list(pool.prompts[cap - n:cap]) != list(eval_prompts[cap - n:cap]):
        return None
    return slice(cap - n, cap)


def round_stop(cfg: PalmConfig, pool: SamplePool, eval_prompts: list[str], rewards, weights, seed: int,
               label: str = "") -> RoundStop | None:
    """The test of params.yaml for an rsft job at `weights`, or None where no round is looked at
    (look_prompts). Best-of-N's answers come from best_of_n, the one place they are picked."""
    from palm_tasks.best_of_n import BestOfN, paired_evidence

    where = look_prompts(cfg, pool, eval_prompts)
    if where is None:
        return None
    t = cfg.training
    w = np.asarray(weights, float)
    best = paired_evidence(cfg, BestOfN(pool, t.min_relevance)).bon(w)[where]
    return RoundStop(list(eval_prompts[where]), best @ w, w, t.stop_alpha / (t.rounds - 1),
                     tuple(rewards), cfg.evaluation, int(seed), label)
