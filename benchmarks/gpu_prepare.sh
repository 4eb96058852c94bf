#!/bin/bash
# Here (no GPU), before the device calls of docs/gpu.md: the wheels the GPU machine lacks into
# .whl/, and SmolLM2's GGUF file (98 MB) in two halves, .gpu-part1/ and .gpu-part2/, because one
# device call carries at most 64 MiB. All three folders are git-ignored. Run from the repo root.
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
rm -rf .whl .gpu-part1 .gpu-part2
# Packages of the pipeline's stack the GPU image does not have (its list: the device tool's
# KINDS.md), at the versions this project runs; torch, transformers, accelerate, pyarrow and
# pandas are there already.
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0 vaderSentiment==3.3.2 chatterbot-corpus==1.3.3
gguf=$("$py" -c "from palm_tasks.llm.base_model import smollm2_gguf_path; print(smollm2_gguf_path())")
mkdir -p .gpu-part1 .gpu-part2
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
head -c "$half" "$gguf" > .gpu-part1/smollm2.gguf.part
tail -c +$(( half + 1 )) "$gguf" > .gpu-part2/smollm2.gguf.part
sha256sum "$gguf" | cut -d' ' -f1 > .gpu-part2/smollm2.gguf.sha256
du -sh .whl .gpu-part1 .gpu-part2
