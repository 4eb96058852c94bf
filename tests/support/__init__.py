"""What tests and benchmarks share that is no part of the product: synthetic fronts with exact
optima (fronts.py)."""
