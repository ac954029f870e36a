#!/bin/bash
# The harness runs of this study, one seed after another, leak-free (the preset's own selection), one thread each:
#   run.sh CATEGORY ROOT EPOCHS EVAL_EVERY EXPERIMENT PRESET SEED...   (more --set options in $EXTRA)
# e.g. EXTRA="--set train.lr=3e-3 --set train.cosine=true" run.sh screw ../shared/data/mvtec_screw 30 2 \
#        lr3cos-screw efficientnet_lite0_patch 0 1 2      (then: fastflow report --experiment lr3cos-screw)
# (run then with the preset at lr 1e-3 and no cosine, hence the EXTRA; the preset now holds both, and 30 epochs.)
cd "$(dirname "$0")/../../.."
export MLFLOW_DISABLE_TELEMETRY=true OMP_NUM_THREADS=1 MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlruns/mlflow.db}
cat=$1 root=$2 epochs=$3 every=$4 exp=$5 preset=$6; shift 6
for seed in "$@"; do
  .venv/bin/fastflow train --config experiments/$preset.yaml --set data.root=$root \
    --set data.category=$cat --set train.seed=$seed --set train.epochs=$epochs --set eval.eval_every=$every \
    --set train.num_threads=1 --set train.cache_dir=.cache/features --set tracking.experiment=$exp \
    --set tracking.run_name=$exp-s$seed $EXTRA 2>&1 | grep -v Warn | grep -v "it/s\]" | tail -8
done
