#!/usr/bin/env bash
# The seasonal hybrid (worker retrain --seasons auto) beside the plain network and the
# statsforecast peers, on the bundled real data sets at h1 and h24 (issue 18's measurement).
#
# Usage: [SEASONS=auto|48,336] [EXTRA="--seed 1"] experiments/hybrid-vs-plain.sh OUT [h1|h24] [DATASET ...]
#   For each data set: a model directory OUT/HZ/NAME; a plain version is trained there unless
#   one is there already (copy an earlier one in to reuse it), then the hybrid, with the same
#   settings (hidden 64, 2 layers, one thread; 2 min of training at h1, 3 at h24: small models
#   that fit this 2-core machine). Then `worker evaluate --version HYBRID --versus PLAIN` with
#   the peers on 300 held-out origins writes OUT/HZ-NAME.eval.json; the gate's verdict (is the
#   hybrid better than the serving plain version on the held-out windows) is in
#   OUT/HZ-NAME.hybrid.json. experiments/hybrid_table.py prints the table.
set -uo pipefail
out=${1:?usage: $0 OUT [h1|h24] [DATASET ...]}
hz=${2:-h1}
shift 2 2>/dev/null || shift $#
names=${*:-seattle-temps sf-temps sea-temp glucose co2 taylor}
py=${PY:-.venv/bin/python}
seasons=${SEASONS:-auto}  # name them to measure the hybrid where auto keeps the plain network
case $hz in
  h1) cfg=configs/retrain.yaml; budget=2m ;;
  h24) cfg=configs/retrain-h24.yaml; budget=3m ;;
  *) echo "horizon: h1 or h24, got $hz" >&2; exit 2 ;;
esac
export OMP_NUM_THREADS=1
for name in $names; do
  dir=$out/$hz/$name
  mkdir -p "$dir"
  train() {  # LABEL [extra retrain flags...]
    local label=$1; shift
    $py -m deploy.cli retrain --config $cfg --data dataset://$name --model-dir "$dir" \
      --run-dir "$out/runs" --hidden-size 64 --num-layers 2 --time-budget $budget --threads 1 \
      --logger none ${EXTRA:-} "$@" > "$out/$hz-$name.$label.json" 2> "$out/$hz-$name.$label.log"
  }
  echo "== $hz $name $(date -u +%T)"
  if [ ! -s "$dir/CURRENT" ]; then
    train plain --seasons none || { echo "plain retrain failed: $out/$hz-$name.plain.log"; continue; }
  fi
  plain=$(cat "$dir/CURRENT")
  train hybrid --seasons "$seasons" || { echo "hybrid retrain failed: $out/$hz-$name.hybrid.log"; continue; }
  hybrid=$($py -c "import json,sys; print(json.load(open(sys.argv[1]))['version'])" \
    "$out/$hz-$name.hybrid.json")
  $py -m deploy.cli evaluate --data dataset://$name --model-dir "$dir" --version "$hybrid" \
    --versus "$plain" --out "$out/$hz-$name.eval.json" > /dev/null 2> "$out/$hz-$name.eval.log"
  echo "rc $? hybrid $hybrid plain $plain"
done
echo "done $(date -u +%T)"
