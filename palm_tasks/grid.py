"""Compatibility module: the weight-vector names now live in palm_tasks.core (simplex.py, grid.py).

See docs/theory.md section 2 for the PALM grid and palm_tasks/core/ for the code.
"""
from palm_tasks.core.grid import grid_levels, grid_size_bound, palm_grid, snap_to_grid
from palm_tasks.core.simplex import (check_d, check_tolerances, check_weights, dirichlet_users,
                                     extreme_weights, random_weights, simplex_lattice, uniform_weights)

__all__ = ["palm_grid", "grid_size_bound", "grid_levels", "snap_to_grid", "uniform_weights",
           "random_weights", "simplex_lattice", "extreme_weights", "dirichlet_users",
           "check_weights", "check_d", "check_tolerances"]
