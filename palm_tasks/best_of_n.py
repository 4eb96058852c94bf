"""The best-of-N reference of the base model's sample pool: the evidence that needs no training
(docs/evidence.md, docs/theory.md section 8).

`BestOfN(samples, min_relevance)` is the one place it is computed: the lazy search's bound and
its beaten-row test, the coverage stage's certificate and audit, the evaluate stage's gaps and
the rewards stage's record all call it. At weights W it gives w . R_BoN(w) and its se
(`__call__`), or the value vectors (`vectors`); it picks among the on-topic answers
(training.min_relevance), as members are trained to give, and memoizes by the weights.
`paired_evidence` hands its per-prompt answers to the paired decisions (core.paired) with the
settings of params.yaml.
"""

from __future__ import annotations

import numpy as np

from palm_tasks.config import PalmConfig
from palm_tasks.core.confidence import Looks
from palm_tasks.core.evidence import best_of_n, scalar
from palm_tasks.core.paired import PairedEvidence
from palm_tasks.schema import SamplePool


class BestOfN:
    """W (m, d) -> (w . R_BoN(w) (m,), its se (m,)) from the base's sample pool on the eval prompts."""

    def __init__(self, samples: SamplePool, min_relevance: float):
        self.samples, self.min_relevance = samples, float(min_relevance)
        self.n = samples.n
        self._cache: dict[bytes, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def on_topic(self) -> str:
        """How the answers are restricted, for a sentence ('' when every answer counts)."""
        return f" among answers with relevance >= {self.min_relevance:g}" if self.min_relevance > 0 else ""

    @property
    def name(self) -> str:
        return f"best-of-{self.n} of the base{self.on_topic}"

    def _at(self, weights):
        weights = np.ascontiguousarray(np.atleast_2d(np.asarray(weights, float)))
        key = weights.tobytes()
        if key not in self._cache:
            self._cache[key] = best_of_n(self.samples.scores, weights, self.samples.on_topic(self.min_relevance))
        return self._cache[key]

    def __call__(self, weights) -> tuple[np.ndarray, np.ndarray]:
        """(w . R_BoN(w), its se) at each weight."""
        mean, _, scalar_se = self._at(weights)
        return scalar(np.atleast_2d(weights), mean), scalar_se

    def value(self, weights) -> np.ndarray:
        """w . R_BoN(w) at each weight."""
        return self(weights)[0]

    def se(self, weights) -> np.ndarray:
        """The se of w . R_BoN(w) over the prompts, at each weight."""
        return self(weights)[1]

    def vectors(self, weights) -> tuple[np.ndarray, np.ndarray]:
        """(R_BoN(w) (m, d), its per-trait se (m, d)) at each weight."""
        mean, se, _ = self._at(weights)
        return mean, se


def paired_evidence(cfg: PalmConfig, bon: BestOfN) -> PairedEvidence:
    """The paired decisions of params.yaml (docs/theory.md section 13): best-of-N's per-prompt
    answers from the base's sample pool, the tolerances, coverage.alpha, and the planned looks
    (at a policy's first measurement, evaluation.min_prompts in whole chunks, then after every
    evaluation.chunk_prompts more, up to the cap)."""
    ev, samples = cfg.evaluation, bon.samples
    cap = min(ev.n_prompts, len(samples.prompts))
    chunk = min(ev.chunk_prompts, cap)
    first = min(ev.first_prompts, cap) // chunk * chunk
    return PairedEvidence(samples.scores, samples.on_topic(bon.min_relevance), cfg.coverage.eps, cfg.coverage.delta,
                          cfg.coverage.alpha, Looks(chunk, cap, first))
