"""The portfolio core: pure numpy/scipy mathematics of PALM (docs/theory.md sections 2-7).

No I/O, no printing, no imports from the rest of palm_tasks. Read in this order:

- simplex.py      weight vectors, input checks, baseline weight sets (sections 1, 7)
- grid.py         the PALM grid and its size bound (section 2)
- certificate.py  corner weights, the upper bound U, the certificate (sections 4, 6)
- prune.py        set-cover pruning (section 3)
- search.py       the lazy search as ask/tell (section 5)
- routing.py      the one routing rule and the per-weight guarantee (sections 4, 6)
- metrics.py      gaps, usage, output diversity, oracle check (sections 7, 9)
"""
from palm_tasks.core.certificate import (RELATIVE_TO, TOL, Certificate, UpperBound, certify,
                                         corner_weights, eps_at, pessimistic, upper_bounds)
from palm_tasks.core.grid import grid_levels, grid_size_bound, palm_grid, snap_to_grid
from palm_tasks.core.metrics import (Gaps, best_subset, distinct_n, embedding_dispersion, greedy_order,
                                     gap_summary, gaps, mean_se, perplexity_with_se,
                                     spread_subset, usage_perplexity)
from palm_tasks.core.prune import prune, set_cover
from palm_tasks.core.routing import GuaranteeBound, route, usage_shares
from palm_tasks.core.search import SAME_WEIGHT, LazySearch, SearchResult, lazy_search
from palm_tasks.core.simplex import (check_d, check_tolerances, check_weights, dirichlet_users,
                                     extreme_weights, random_weights, simplex_lattice, uniform_weights,
                                     user_populations)

__all__ = [
    "check_d", "check_tolerances", "check_weights", "extreme_weights", "simplex_lattice",
    "uniform_weights", "dirichlet_users", "random_weights", "user_populations",
    "grid_levels", "grid_size_bound", "palm_grid", "snap_to_grid",
    "TOL", "RELATIVE_TO", "Certificate", "UpperBound", "certify", "corner_weights", "upper_bounds",
    "pessimistic", "eps_at",
    "set_cover", "prune",
    "SAME_WEIGHT", "LazySearch", "SearchResult", "lazy_search",
    "route", "usage_shares", "GuaranteeBound",
    "Gaps", "gaps", "usage_perplexity", "gap_summary", "best_subset",
    "greedy_order",
    "spread_subset", "perplexity_with_se", "mean_se", "distinct_n", "embedding_dispersion",
]
