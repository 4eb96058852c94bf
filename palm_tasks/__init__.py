"""PALM: a portfolio of aligned LLMs covering every user's trade-off between traits.

The work of the pipeline, importable without Prefect: configuration, rewards, the weight
grid, alignment jobs, coverage certificates, registration.
"""
