#!/usr/bin/env bash
# The real-data benchmark of the README: 5-fold actor-disjoint CV over actors 1-20, real RAVDESS speech audio
# (16 kHz FLAC) + real per-clip OpenFace action units as the visual input, CPU-sized configurations.
#
#   bash benchmarks/real_data_cv.sh [SHARED_DATA_DIR] [PARALLEL_JOBS]
#
# Each fold is its own single-threaded process (PARALLEL_JOBS at a time, default 2 = the cores of the reference
# machine); then a `--fold=all` call per row only collects the finished folds into cv_metrics.json and prints the
# per-fold table. Interrupted folds resume from their last finished epoch when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${1:-../shared/data}"
JOBS="${2:-2}"
PY="${PYTHON:-python}"
CACHE=checkpoints/cache/ravdess_speech_16k_16x112
COMMON="--dataset=ravdess --data_root=$SHARED/ravdess_speech_16k --cache_dir=$CACHE --actors=1-20 --n_folds=5 \
--num_workers=0 --visual_input=features --feature_file=$SHARED/ravdess_clip_features/au_mfcc.npz"
LITE="train_lite_model.py --preset=cpu --stage1_epochs=8 --stage2_epochs=3 --patience=5"
SIMPLE="train_simple_working.py --epochs=15 --lr=3e-3 --patience=6"
FULL="train_full_model.py --preset=cpu --stage1_epochs=6 --stage2_epochs=2 --patience=4"
ROWS=(  # name|script and arguments: one row of the results table each
  "lite_audio|$LITE --modalities=audio --fusion=concat"
  "lite_au|$LITE --modalities=visual --fusion=concat"
  "lite_concat|$LITE --fusion=concat"
  "lite_product|$LITE --fusion=product"
  "lite_gated|$LITE --fusion=gated"
  "lite_cross_attention|$LITE --fusion=cross_attention"
  "lite_transformer|$LITE --fusion=transformer"
  "simple_audio|$SIMPLE --modalities=audio"
  "simple_audio_au|$SIMPLE"
  "full_audio_au|$FULL"
)

# The cache is built once up front, so that the parallel fold processes only read it.
"$PY" data/prepare_ravdess.py "--root=$SHARED/ravdess_speech_16k" "--cache=$CACHE"
mkdir -p checkpoints/bench_logs
for row in "${ROWS[@]}"; do
  for fold in 0 1 2 3 4; do
    echo "OMP_NUM_THREADS=1 $PY ${row#*|} $COMMON --fold=$fold --run_name=bench_${row%%|*} \
> checkpoints/bench_logs/${row%%|*}_fold$fold.log 2>&1"
  done
done | xargs -d '\n' -P "$JOBS" -I{} bash -c '{}'

for row in "${ROWS[@]}"; do
  echo "== ${row%%|*}"
  $PY ${row#*|} $COMMON --fold=all "--run_name=bench_${row%%|*}" 2>/dev/null | sed -n '/actor-disjoint CV/,$p'
done
