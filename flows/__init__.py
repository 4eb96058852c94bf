"""Prefect orchestration of the PALM stages: thin flows over palm_tasks.stages."""
