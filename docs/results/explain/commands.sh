#!/usr/bin/env bash
# The exact commands behind docs/results/explain/ (docs/explainers.md, "Results"). Run from the repository root.
# Machine: 2 shared CPU cores (load average 15-23 from other jobs during the runs), no GPU; 2026-12-02.
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T=${T:-/tmp/T}; R=$T/runs; mkdir -p "$R"

# 1. the circuit (529 s here): 80 edges, 29 nodes, sha256 fb585108c565...
circuitexplain discover --model smollm2-135m --task ioi --method eap-ig -n 16 --prompt-batch 8 --topk 80 \
    --out "$T/smol-ioi.json" --no-progress

# 2. the explainer / simulator LLM
circuitexplain llm serve --port 8031
LLM="--llm-base-url http://127.0.0.1:8031/v1 --llm-model smollm2-135m --llm-cache $T/llm-cache.sqlite"
COMMON="--model smollm2-135m --graph $T/smol-ioi.json $LLM --no-progress --attach"
U="--units a23.h3,a20.h0,a29.h1,a24.h4,m0,m20 --per-node 2 --max-units 8"      # neuron level: 8 units
UD="--units a23.h3,a20.h0,a29.h1 --per-node 2 --max-units 6"                   # direction level: 6 units

# 3. the first run builds the activation store (20,000 tokens of fortunes, 64-token contexts); the others reuse it
#    (it was built by an earlier run with the same units and settings and moved to $T/store)
circuitexplain explain $COMMON --level neuron $U --explainer vocab --scorer simulation,embedding,tokens \
    --out "$R/neuron-vocab" --store "$T/store"
circuitexplain explain $COMMON --level neuron $U --explainer exemplar-llm --scorer simulation,embedding \
    --out "$R/neuron-exemplar-llm" --store "$T/store"
circuitexplain explain $COMMON --level neuron $U --explainer exemplar-llm --prompt-style delphi \
    --scorer simulation,embedding --out "$R/neuron-exemplar-llm-delphi" --store "$T/store"
circuitexplain explain $COMMON --level neuron $U --explainer self --scorer simulation,embedding \
    --out "$R/neuron-self" --store "$T/store"
circuitexplain explain $COMMON --level direction $UD --explainer vocab --scorer simulation,embedding,tokens \
    --out "$R/direction-vocab" --store "$T/store"
circuitexplain explain $COMMON --level direction $UD --explainer exemplar-llm --scorer simulation,embedding \
    --out "$R/direction-exemplar-llm" --store "$T/store"

# (first attempt, stopped after one unit: detection and fuzzing never parsed; its line is
#  detection-fuzzing-attempt.jsonl) the same neuron-level exemplar-llm run with the units m0,a23.h3,a20.h0,a29.h1,
#  a24.h4,m20,a29.h0,a23.h0 and --scorer simulation,detection,fuzzing,embedding

# 4. shuffled-explanation baselines and the tables (same scorers, same endpoint, same cache)
python scripts/explain_baselines.py "$R"/neuron-vocab "$R"/neuron-exemplar-llm "$R"/neuron-exemplar-llm-delphi \
    "$R"/neuron-self "$R"/direction-vocab "$R"/direction-exemplar-llm --scorers simulation,embedding,tokens \
    $LLM --out docs/results/explain/baselines.json --markdown docs/results/explain/tables.md

circuitexplain llm serve --stop --port 8031
