cd /tmp/wt18
export PYTHONPATH=/tmp/wt18 OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
echo "== h1 $(date -u +%T)"
$PY -m deploy.cli retrain --config /tmp/es/real/h1.yaml --data dataset://taylor --model-dir /tmp/es/real/h1 \
  --hidden-size 64 --num-layers 2 --time-budget 6m --threads 1 --logger none > /tmp/es/real/h1.retrain.json 2> /tmp/es/real/h1.retrain.log
echo "rc $?"
$PY -m deploy.cli evaluate --model-dir /tmp/es/real/h1 --data dataset://taylor --peer-origins 0 --out /tmp/es/real/h1.eval.json > /dev/null 2> /tmp/es/real/h1.eval.log
echo "eval rc $?"
echo "== h24 $(date -u +%T)"
$PY -m deploy.cli retrain --config /tmp/es/real/h24.yaml --data dataset://taylor --model-dir /tmp/es/real/h24 \
  --hidden-size 64 --num-layers 2 --max-epochs 71 --time-budget 10m --threads 1 --logger none > /tmp/es/real/h24.retrain.json 2> /tmp/es/real/h24.retrain.log
echo "rc $?"
$PY -m deploy.cli evaluate --model-dir /tmp/es/real/h24 --data dataset://taylor --peer-origins 0 --out /tmp/es/real/h24.eval.json > /dev/null 2> /tmp/es/real/h24.eval.log
echo "eval rc $?"
echo ALLDONE $(date -u +%T)
