#!/usr/bin/env bash
# Build the virtualenv in which the SAELens cross-load test runs (tests/test_saelens_crossload.py).
# SAELens pins transformer-lens < 4, so it cannot share the project's .venv (TransformerLens 4). The test only
# needs SAELens' SAE classes, so the install is: the CPU torch wheel first (a bare torch requirement would pull a
# multi-GB CUDA build), then sae-lens with its dependencies. About 1-2 minutes on 2 cores.
# Usage: scripts/saelens_env.sh [DIR]   (default: $CIRCUITEXPLAIN_SAELENS_VENV or .venv-saelens)
set -euo pipefail
DIR="${1:-${CIRCUITEXPLAIN_SAELENS_VENV:-.venv-saelens}}"
TORCH="${SAELENS_TORCH:-torch==2.13.0}"
SAELENS="${SAELENS_PACKAGE:-sae-lens}"
if [ -f "$DIR/.installed" ]; then
  echo "SAELens venv ready in $DIR"
  exit 0
fi
rm -rf "$DIR"
python3 -m venv "$DIR"
"$DIR/bin/pip" install -q --upgrade pip
"$DIR/bin/pip" install -q "$TORCH"
"$DIR/bin/pip" install -q "$SAELENS"
"$DIR/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$DIR/bin/python" -c "import sae_lens, torch; print('sae_lens', sae_lens.__version__, 'torch', torch.__version__)"
touch "$DIR/.installed"
echo "SAELens venv ready in $DIR"
