"""Compatibility module: the coverage names now live in palm_tasks.core.

certificate.py (certify, corner weights, U), prune.py (set cover), search.py (lazy search, also
as the ask/tell LazySearch), metrics.py (gaps, usage, oracle check), routing.py (the routing
rule); docs/theory.md sections 3-7 give the mathematics.
"""
from palm_tasks.core.certificate import (RELATIVE_TO, TOL, Certificate, UpperBound, certify,
                                         corner_weights, upper_bounds)
from palm_tasks.core.metrics import Gaps, OracleCheck, gaps, oracle_check, usage_perplexity
from palm_tasks.core.prune import prune, set_cover
from palm_tasks.core.search import SAME_WEIGHT, LazySearch, SearchResult, lazy_search

__all__ = ["certify", "prune", "lazy_search", "gaps", "oracle_check", "usage_perplexity",
           "set_cover", "corner_weights", "upper_bounds", "UpperBound", "Certificate",
           "SearchResult", "OracleCheck", "Gaps", "TOL", "RELATIVE_TO", "SAME_WEIGHT", "LazySearch"]
