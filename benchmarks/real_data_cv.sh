#!/usr/bin/env bash
# The real-data benchmark of the README: 5-fold actor-disjoint CV over actors 1-20, real RAVDESS speech audio
# (16 kHz FLAC) + real per-clip OpenFace action units as the visual input, the scripts' default recipe with the
# CPU-sized model presets.
#
#   bash benchmarks/real_data_cv.sh [SHARED_DATA_DIR] [PARALLEL_JOBS]
#   ROWS_TO_RUN="lite_audio lite_concat" SEEDS="0 1 2" bash benchmarks/real_data_cv.sh   # some rows, 3 seeds
#
# Without ROWS_TO_RUN every row runs except the *_handset ones: the Lite rows again with the cpu preset's previous
# hand-set constants, which run only when ROWS_TO_RUN names them.
#
# Each fold is its own single-threaded process (PARALLEL_JOBS at a time, default 2 = the cores of the reference
# machine); then a `--fold=all` call per row only collects the finished folds into cv_metrics.json and prints the
# per-fold table. Seed 0 runs as bench_<row>, seed s as bench_<row>_seed<s>; `python benchmarks/results_table.py`
# prints the results table of docs/results.md (with the mean over seeds and the seed ensemble where several seeds finished), and
# `python benchmarks/fit_gap.py` scores each row's tested weights on its own training actors (underfit or overfit).
# Interrupted folds resume from their last finished epoch when the script is run again; finished ones are skipped.
#
# The *_cal* rows are person-calibrated (data/calibration.py): every actor's inputs standardised by statistics of
# that actor's own clips (unlabeled): all of them (cal), 16/8/4/30 drawn per actor (cal16, ...), or the 4 neutral
# clips only (calneutral; those clips of a test actor are then not scored).
#
# LITE, SIMPLE and FULL are the single definition of the benchmark configurations: an independent evaluation
# reruns a row on other actors by adding --actors=... --test_actors=... --val_actors=... to them.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${1:-../shared/data}"
JOBS="${2:-2}"
SEEDS="${SEEDS:-0}"
PY="${PYTHON:-python}"
CACHE=checkpoints/cache/ravdess_speech_16k_16x112
COMMON="--dataset=ravdess --data_root=$SHARED/ravdess_speech_16k --cache_dir=$CACHE --actors=1-20 --n_folds=5 \
--num_workers=0 --visual_input=features --feature_file=$SHARED/ravdess_clip_features/au_mfcc.npz"
LITE="train_lite_model.py --preset=cpu"
SIMPLE="train_simple_working.py"
FULL="train_full_model.py --preset=cpu"
# The previous hand-set constants, budget and selection of the cpu preset (before tune.py's best constants, 40 epochs
# and the EMA became its defaults), kept as rows so that the two recipes compare on the same folds
HANDSET="--encoder_dropout=0.2 --dropout=0.2 --modality_dropout=0.2 --weight_decay=0.01 --stage1_lr=0.002 \
--stage1_epochs=20 --select_checkpoint=last"
CAL="--calibration=person"
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
  "simple_audio_au_cal|$SIMPLE $CAL"
  "simple_audio_au_cal16|$SIMPLE $CAL --calibration_clips=16"
  "simple_audio_au_cal8|$SIMPLE $CAL --calibration_clips=8"
  "simple_audio_au_calneutral|$SIMPLE $CAL --calibration_source=neutral"
  "lite_audio_cal|$LITE --modalities=audio --fusion=concat $CAL"
  "lite_audio_cal16|$LITE --modalities=audio --fusion=concat $CAL --calibration_clips=16"
  "lite_audio_cal8|$LITE --modalities=audio --fusion=concat $CAL --calibration_clips=8"
  "lite_audio_calneutral|$LITE --modalities=audio --fusion=concat $CAL --calibration_source=neutral"
  "lite_au_cal|$LITE --modalities=visual --fusion=concat $CAL"
  "lite_au_cal30|$LITE --modalities=visual --fusion=concat $CAL --calibration_clips=30"
  "lite_au_cal16|$LITE --modalities=visual --fusion=concat $CAL --calibration_clips=16"
  "lite_au_cal8|$LITE --modalities=visual --fusion=concat $CAL --calibration_clips=8"
  "lite_au_cal4|$LITE --modalities=visual --fusion=concat $CAL --calibration_clips=4"
  "lite_au_calneutral|$LITE --modalities=visual --fusion=concat $CAL --calibration_source=neutral"
  "lite_concat_cal|$LITE --fusion=concat $CAL"
  "lite_concat_cal30|$LITE --fusion=concat $CAL --calibration_clips=30"
  "lite_concat_cal16|$LITE --fusion=concat $CAL --calibration_clips=16"
  "lite_concat_cal8|$LITE --fusion=concat $CAL --calibration_clips=8"
  "lite_concat_cal4|$LITE --fusion=concat $CAL --calibration_clips=4"
  "lite_concat_calneutral|$LITE --fusion=concat $CAL --calibration_source=neutral"
  "lite_cross_attention_cal|$LITE --fusion=cross_attention $CAL"
  "lite_transformer_cal|$LITE --fusion=transformer $CAL"
  "full_audio_au_cal|$FULL $CAL"
)
for row in "${ROWS[@]}"; do  # every Lite row again as <name>_handset, with the previous constants
  if [[ "$row" == lite_* && "$row" != *_cal* ]]; then ROWS+=("${row%%|*}_handset|${row#*|} $HANDSET"); fi
done
SELECTED=()
for row in "${ROWS[@]}"; do
  name="${row%%|*}"
  if [[ -z "${ROWS_TO_RUN:-}" && "$name" != *_handset ]] || [[ " ${ROWS_TO_RUN:-} " == *" $name "* ]]; then
    SELECTED+=("$row")
  fi
done
NAMES=" ${ROWS[*]%%|*} "
for name in ${ROWS_TO_RUN:-}; do  # a misspelt row would otherwise run nothing and exit 0
  if [[ "$NAMES" != *" $name "* ]]; then
    echo "error: ROWS_TO_RUN names '$name', which is not a row; the rows:${NAMES% }" >&2
    exit 2
  fi
done
run_name() {  # row name, seed
  if [ "$2" = 0 ]; then echo "bench_$1"; else echo "bench_$1_seed$2"; fi
}

# The cache is built once up front, so that the parallel fold processes only read it.
"$PY" data/prepare_ravdess.py "--root=$SHARED/ravdess_speech_16k" "--cache=$CACHE"
mkdir -p checkpoints/bench_logs
for seed in $SEEDS; do
  for row in "${SELECTED[@]}"; do
    name=$(run_name "${row%%|*}" "$seed")
    for fold in 0 1 2 3 4; do
      echo "OMP_NUM_THREADS=1 $PY ${row#*|} $COMMON --seed=$seed --fold=$fold --run_name=$name \
> checkpoints/bench_logs/${name}_fold$fold.log 2>&1"
    done
  done
done | xargs -d '\n' -P "$JOBS" -I{} bash -c '{}'

for seed in $SEEDS; do
  for row in "${SELECTED[@]}"; do
    name=$(run_name "${row%%|*}" "$seed")
    echo "== $name"
    $PY ${row#*|} $COMMON --seed=$seed --fold=all "--run_name=$name" 2>/dev/null | sed -n '/actor-disjoint CV/,$p'
  done
done
