#!/bin/bash
cd "$(dirname "$0")/../../.."
export MLFLOW_DISABLE_TELEMETRY=true OMP_NUM_THREADS=1 MLFLOW_TRACKING_URI=sqlite:///${STORE:-mlruns/mlflow.db}
for seed in "$@"; do
  .venv/bin/fastflow train --config experiments/efficientnet_lite0_patch.yaml --set data.root=../shared/data/mvtec_screw \
    --set data.category=screw --set train.seed=$seed --set train.epochs=30 --set eval.eval_every=5 \
    --set train.num_threads=1 --set train.cache_dir=.cache/features --set tracking.experiment=patch-screw \
    --set tracking.run_name=patch-screw-s$seed 2>&1 | grep -v Warn | tail -6
done
