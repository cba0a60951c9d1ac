#!/usr/bin/env bash
# Build the virtualenv in which auto-circuit (Miller et al. 2024, PyPI auto-circuit) runs for the external EAP
# comparison (scripts/compare_eap_external.py, scripts/autocircuit_worker.py, tests/test_external_eap.py).
# auto-circuit needs TransformerLens' HookedTransformer, which TransformerLens 4 (this project's .venv) no longer
# has: it runs against transformer-lens 2.18.0 (whose ungroup_grouped_query_attention gives GQA models per-head
# k/v inputs) in a venv of its own.
# Install: the CPU torch wheel first (a bare torch requirement would pull a multi-GB CUDA build); auto-circuit with
# --no-deps, because its declared dependencies include tracr-pypi (JAX, about 650 MB), kaleido and word2word, which
# only its tracr tasks, plot export and word-translation datasets import; then transformer-lens 2.18.0 and the
# packages the modules we use import (einops, ordered-set, plotly, blobfile, vscode-tqdm). datasets/pyarrow are
# pinned because transformer-lens 2.18 holds numpy < 2 and the newest pyarrow needs numpy >= 2.
# The last line imports every auto-circuit module the worker uses. About 1-2 minutes on 2 cores.
# Usage: scripts/autocircuit_env.sh [DIR]   (default: $CIRCUITEXPLAIN_AUTOCIRCUIT_VENV or .venv-autocircuit)
set -euo pipefail
DIR="${1:-${CIRCUITEXPLAIN_AUTOCIRCUIT_VENV:-.venv-autocircuit}}"
TORCH="${AUTOCIRCUIT_TORCH:-torch==2.13.0}"
if [ -f "$DIR/.installed" ]; then
  echo "auto-circuit venv ready in $DIR"
  exit 0
fi
rm -rf "$DIR"
python3 -m venv "$DIR"
"$DIR/bin/pip" install -q --upgrade pip
"$DIR/bin/pip" install -q "$TORCH"
"$DIR/bin/pip" install -q --no-deps auto-circuit==1.0.1
"$DIR/bin/pip" install -q transformer-lens==2.18.0 "datasets>=2.7.1,<4" "pyarrow>=15,<21" einops ordered-set plotly \
  blobfile vscode-tqdm
"$DIR/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$DIR/bin/python" -c "
import auto_circuit.utils.graph_utils, auto_circuit.prune_algos.mask_gradient
import auto_circuit.prune_algos.edge_attribution_patching, auto_circuit.utils.ablation_activations, auto_circuit.data
from importlib.metadata import version
print('auto-circuit', version('auto-circuit'), 'transformer-lens', version('transformer-lens'), 'torch', version('torch'))"
touch "$DIR/.installed"
echo "auto-circuit venv ready in $DIR"
