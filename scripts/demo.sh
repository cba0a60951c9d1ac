#!/usr/bin/env bash
# What `make demo` runs on the default zoo model: check the model's mechanism figures, discover its circuit
# with ACDC and EAP-IG, evaluate the methods (faithfulness curves, CPR/CMD), export the circuit for viewers and
# explain the EAP-IG circuit's units offline (vocabulary projections; the LLM explainer needs `llm serve`).
set -euo pipefail
CE=${CE:-circuitexplain}; MODEL=${MODEL:-ioi-2l}; OUT=${OUT:-out}
PY=${PY:-$(dirname "$(command -v "$CE")")/python}
TASK=${TASK:-$("$PY" -c "from circuits.zoo.recipes import RECIPES; print(RECIPES['$MODEL'].data)")}
mkdir -p "$OUT"
echo "== 1. zoo check $MODEL"
"$CE" zoo check "$MODEL"
echo; echo "== 2. discover: ACDC and EAP-IG on $MODEL / $TASK"
"$CE" discover --model "$MODEL" --task "$TASK" --method acdc --out "$OUT/$MODEL-acdc.json"
"$CE" discover --model "$MODEL" --task "$TASK" --method eap-ig --out "$OUT/$MODEL-eap-ig.json"
echo; echo "== 3. export the ACDC circuit"
for fmt in html graphml neuronpedia; do
  ext=$fmt; [ "$fmt" = neuronpedia ] && ext=np.json
  "$CE" export "$OUT/$MODEL-acdc.json" --format "$fmt" --out "$OUT/$MODEL-acdc.$ext"
done
echo; echo "== 4. eval circuits: faithfulness curves of each method against random circuits"
"$CE" eval circuits --model "$MODEL" --task "$TASK" --methods acdc,eap,eap-ig,node-patch --out "$OUT/eval-$MODEL"
echo; echo "== 5. explain the EAP-IG circuit's units offline (vocabulary projections, scored on held-out exemplars)"
"$CE" explain --model "$MODEL" --graph "$OUT/$MODEL-eap-ig.json" --level neuron --explainer vocab --scorer tokens \
  --out "$OUT/explain-$MODEL" --attach
"$CE" export "$OUT/explain-$MODEL/circuit-explained.json" --format html --out "$OUT/$MODEL-eap-ig-explained.html"
echo; echo "Open $OUT/$MODEL-acdc.html and $OUT/$MODEL-eap-ig-explained.html in a browser; plots in $OUT/eval-$MODEL/*.png"
