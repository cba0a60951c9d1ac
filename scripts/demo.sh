#!/usr/bin/env bash
# The demo `make demo` runs: check the default zoo model, then discover its circuit and export it.
set -euo pipefail
CE=${CE:-circuitexplain}; MODEL=${MODEL:-ioi-2l}; OUT=${OUT:-out}
mkdir -p "$OUT"
echo "== zoo check $MODEL"
"$CE" zoo check "$MODEL"
