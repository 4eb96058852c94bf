"""Synthetic per-prompt rewards with known means, for testing decisions taken on noisy values
(docs/theory.md section 13).

Each prompt x has an effect u_x shared by every policy (easy and hard prompts: this is what makes
paired differences tighter than either value), and each answer its own noise; rewards are
clipped to [0, 1], as normalized rewards are. A policy's table is the mean of `answers` answers
per prompt; the base's sample pool holds N answers per prompt, from which best-of-N picks. The
defaults are of the size measured on SmolLM2's sample pool (answers of one policy to one prompt
correlate about 0.1-0.6 across prompts, per-prompt sd about 0.08-0.13).

`true_values` and `true_best_of_n` compute the means by Monte Carlo over many prompts, once: the
truth a decision is judged against.
"""
from dataclasses import dataclass

import numpy as np

from palm_tasks.core.evidence import chosen_answers


@dataclass(frozen=True)
class NoisyPolicies:
    means: np.ndarray  # (n, d): the centre of each policy's answers (before clipping)
    base: np.ndarray  # (d,): the centre of the base's answers
    prompt_sd: float = 0.10
    answer_sd: float = 0.12
    answers: int = 2
    best_of: int = 8

    def draw(self, rng, prompts: int):
        """(tables: n arrays (prompts, d), the base's sample pool (prompts, N, d))."""
        d = self.base.shape[0]
        u = rng.normal(0, self.prompt_sd, (prompts, 1, d))
        tables = [np.clip(m + u + rng.normal(0, self.answer_sd, (prompts, self.answers, d)), 0, 1).mean(axis=1)
                  for m in self.means]
        pool = np.clip(self.base + u + rng.normal(0, self.answer_sd, (prompts, self.best_of, d)), 0, 1)
        return tables, pool

    def true_values(self, rng, prompts: int = 400_000) -> np.ndarray:
        """(n, d): each policy's expected reward (clipping included)."""
        d = self.base.shape[0]
        u = rng.normal(0, self.prompt_sd, (prompts, d))
        return np.array([np.clip(m + u + rng.normal(0, self.answer_sd, (prompts, d)), 0, 1).mean(axis=0)
                         for m in self.means])

    def true_best_of_n(self, rng, weights, prompts: int = 200_000) -> np.ndarray:
        """(m,): w . R_BoN(w), the expected value of best-of-N's pick at each weight."""
        W = np.atleast_2d(np.asarray(weights, float))
        d = self.base.shape[0]
        u = rng.normal(0, self.prompt_sd, (prompts, 1, d))
        pool = np.clip(self.base + u + rng.normal(0, self.answer_sd, (prompts, self.best_of, d)), 0, 1)
        return np.einsum("mpd,md->m", chosen_answers(pool, W, None), W) / prompts


def searched(paired, W, tables, start: int, reference=None):
    """A lazy search over given rows (no training budget) measured as the align stage measures
    them: every row on `start` prompts, then more where LazySearch.evaluation_needed says, up to
    the cap. Returns (the search's result: pruned members and their certificate, the prompts
    each row was measured on)."""
    from palm_tasks.core.search import LazySearch

    d = W.shape[1]
    n = [start] * len(tables)
    search = LazySearch(d, paired.eps, paired.delta, 0, initial_weights=W,
                        initial_values=np.array([t[:start].mean(axis=0) for t in tables]),
                        initial_std_errors=np.zeros((len(W), d)), reference=reference, paired=paired,
                        initial_tables=[t[:start] for t in tables])
    while need := search.evaluation_needed():
        for r, target in need.items():
            n[r] = target
            search.update(r, tables[r][:target])
    assert search.ask() is None  # no budget: the search is done once nothing is left to measure
    return search.result(), n
