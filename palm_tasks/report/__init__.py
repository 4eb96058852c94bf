"""What the project prints and draws: console tables, the coverage plots, the evaluation report."""
