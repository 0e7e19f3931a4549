#!/usr/bin/env bash
# The hybrid with and without the seasonal state's level as an input channel (issue 18: "the
# state's own forecast as an input"), every other setting as in experiments/hybrid-vs-plain.sh.
#
# Usage: experiments/level-channel.sh OUT [h1|h24] [DATASET ...]
#   For each data set, in OUT/HZ/NAME: the hybrid without the channel (the YAML's model section
#   plus `season_level: false`), then with it (the default), both `--seasons auto`; then
#   `worker evaluate --version WITH --versus WITHOUT` with the peers on 300 held-out origins
#   writes OUT/HZ-NAME.eval.json, and a table row is printed: MAE with / without / best peer.
set -uo pipefail
out=${1:?usage: $0 OUT [h1|h24] [DATASET ...]}
hz=${2:-h24}
shift 2 2>/dev/null || shift $#
names=${*:-seattle-temps sf-temps taylor}
py=${PY:-.venv/bin/python}
case $hz in
  h1) cfg=configs/retrain.yaml; budget=2m ;;
  h24) cfg=configs/retrain-h24.yaml; budget=3m ;;
  *) echo "horizon: h1 or h24, got $hz" >&2; exit 2 ;;
esac
mkdir -p "$out"
sed '/^model:/a\  season_level: false' $cfg > "$out/$hz-nolevel.yaml"
export OMP_NUM_THREADS=1
for name in $names; do
  dir=$out/$hz/$name
  mkdir -p "$dir"
  train() {  # LABEL CONFIG
    $py -m deploy.cli retrain --config "$2" --data dataset://$name --model-dir "$dir" \
      --run-dir "$out/runs" --hidden-size 64 --num-layers 2 --time-budget $budget --threads 1 \
      --logger none --seasons auto --force ${EXTRA:-} > "$out/$hz-$name.$1.json" 2> "$out/$hz-$name.$1.log"
  }
  version() { $py -c "import json,sys; print(json.load(open(sys.argv[1]))['version'])" "$1"; }
  echo "== $hz $name $(date -u +%T)"
  train nolevel "$out/$hz-nolevel.yaml" || { echo "failed: $out/$hz-$name.nolevel.log"; continue; }
  train level $cfg || { echo "failed: $out/$hz-$name.level.log"; continue; }
  with=$(version "$out/$hz-$name.level.json")
  without=$(version "$out/$hz-$name.nolevel.json")
  $py -m deploy.cli evaluate --data dataset://$name --model-dir "$dir" --version "$with" \
    --versus "$without" --out "$out/$hz-$name.eval.json" > /dev/null 2> "$out/$hz-$name.eval.log"
  $py - "$out/$hz-$name.eval.json" "$without" "$name" "$hz" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
m = rep["peers"]["metrics"]
w, wo = m["model"]["mae"], m[f"model@{sys.argv[2]}"]["mae"]
best = min(m[k]["mae"] for k in ("autoets", "mstl") if k in m)
oc = rep.get("online_calibration", {}).get("online", {})
print(f"| {sys.argv[3]} | {sys.argv[4][1:]} | {w:.4g} | {wo:.4g} | {best:.4g} | {w / wo:.3f} | "
      f"{w / best:.3f} | {oc.get('coverage_80', 0) * 100:.1f} / {oc.get('coverage_95', 0) * 100:.1f} |")
PY
done
echo "done $(date -u +%T)"
