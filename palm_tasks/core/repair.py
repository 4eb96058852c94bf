"""Which beaten row is repaired first (docs/theory.md section 9; docs/search.md).

When the evidence beats several rows, the lazy search (core/search.py) repairs first the one
whose repair would lower the pool's worst gap against the evidence most: the row furthest short
at its own weight is not always the one that limits the worst gap, a row that also serves many
other weights may be (benchmarks/repair_order.py measures it).
"""
import numpy as np

from palm_tasks.core.simplex import simplex_lattice

# step 1/n of the lattice on which a repair's effect on the worst gap is judged, per d (about
# 200-500 weights; 1/8 beyond d = 4)
REPAIR_LATTICE = {2: 200, 3: 30, 4: 12}


def repair_order(b, tw, tv, reference):
    """Beaten rows (b: core.evidence.Beaten of the rows tw, tv), the one whose repair would lower
    the pool's worst gap against the evidence most first (ties: the larger relative shortfall at
    its own weight, then the earlier row); reference(W) -> (best-of-N values, se).

    What a repair does to row j's other traits is unknown; the measured ones lie between two
    models, and the predicted worst gap is the mean of the two: the repair closes the shortfall
    at w_j and changes nothing else (R_j moves by shortfall_j w_j / |w_j|^2, the smallest move
    that does it: a corner row gains in its own trait only), or it scales the whole row by
    E(w_j) / w_j . R_j. The worst gap 1 - max_i w . R_i / E(w), E the evidence, is taken over
    a lattice of the simplex and the trained weights."""
    rows = np.flatnonzero(b.beaten)
    if len(rows) < 2:
        return rows
    d = tw.shape[1]
    own = np.einsum("nd,nd->n", tw, tv)
    target = own + b.shortfall
    relative = np.divide(b.shortfall, target, out=np.zeros_like(own), where=target > 0)
    test = np.vstack([simplex_lattice(d, REPAIR_LATTICE.get(d, 8)), tw])
    values = test @ tv.T
    evidence_at = np.maximum(reference(test)[0], values.max(axis=1))

    def worst_gap(j, column):
        lifted = values.copy()
        lifted[:, j] = column
        gap = np.divide(evidence_at - lifted.max(axis=1), evidence_at, out=np.zeros(len(test)),
                        where=evidence_at > 0)
        return float(gap.max())
    worst_after = []
    for j in rows:
        along_w = worst_gap(j, values[:, j] + b.shortfall[j] * (test @ tw[j]) / (tw[j] @ tw[j]))
        scaled = worst_gap(j, values[:, j] * target[j] / own[j]) if own[j] > 0 else along_w
        worst_after.append(round(0.5 * (along_w + scaled), 12))  # rounded: float noise is no preference
    return rows[np.lexsort((-relative[rows], np.array(worst_after)))]
