#!/usr/bin/env bash
# The check on a CUDA machine, one call per part, each part inside a time budget (GPU_CHECK_BUDGET seconds,
# default 400: one device call of under 7 minutes with the payload's unpacking, so that a rerun still fits
# the lease).
#
# It starts with a preflight (scripts/gpu_preflight.py: CUDA really runs, every import, Fashion-MNIST, the
# Inception weights) and stops there, with one line, when anything is missing. Then every step runs under its
# own time limit and ends with one of three statuses:
#   passed   exit 0 (the tests step: and no test skipped: a CUDA test that skips checks nothing)
#   failed   a non-zero exit, or a step that ran past its OWN limit (a hang, or far slower than measured)
#   cut      the budget cut its limit and it ran out, or too little budget was left to start it
# and the verdict is "passed" (exit 0) only when every step that was to run passed; "failed" (exit 1) when
# any failed; else "incomplete" (exit 3) when any was cut: rerun those with GPU_CHECK_STEPS in another call.
#
#   bash scripts/gpu_check.sh                        # GPU_CHECK_PART=figures, in this order:
#       preflight  device, versions, imports, data, weights (always runs, whatever GPU_CHECK_STEPS says)
#       tests      the tests marked cuda (pytest -m cuda tests)
#       plan       the lag plan of configs/fashion_mnist_gpu.yaml
#       ref_stats  the reference statistics the runs use (cached)
#       one_seed   configs/fashion_mnist_gpu.yaml, one seed alone: its evaluation lines, step rate, wall time
#       bench_lawa snapshot / average rows against their copy bounds, training-step overhead
#       bench_fid  FID/KID maths on the device vs torch-fidelity on the CPU
#       bench_eval trainer steps/s with the fast path off and on
#     The steps before one_seed leave it GPU_CHECK_ONE_SEED_RESERVE_S of the budget (default 240: one seed alone
#     took 207 s on an H200), so that the training run is not starved by them; the long benches come after it.
#   GPU_CHECK_PART=seeds bash scripts/gpu_check.sh   # three seeds of the same config at once, and their report
#   GPU_CHECK_PART=paper bash scripts/gpu_check.sh   # configs/paper_regime_gpu.yaml: plan, three seeds at
#       once and their report
#   GPU_CHECK_PART=text2image bash scripts/gpu_check.sh   # a small latent text-to-image run under the launch plugin:
#       t2i_data      Fashion-MNIST as captioned image folders, train/ and the held-out test/ (scripts/make_caption_folder.py)
#       t2i_pipe      a Stable-Diffusion-style pipeline with random weights from configs/text_to_image_gpu.yaml
#                     (scripts/make_tiny_pipeline.py; its tokenizer spells the captions' words)
#       t2i_train     scripts/train_text_to_image.py --use_ema under `-m lawa_diffusion.launch`: LAWA k/ν, FID on the
#                     held-out prompts and images (--lawa_fid_prompts test/ --lawa_fid_num_reference N), power-EMA
#                     snapshots for the search in hindsight (--lawa_posthoc_every_n_steps)
#       t2i_hindsight `lawa-diffusion hindsight` on a small σ_rel grid at two evaluated steps
#       t2i_report    `lawa-diffusion report` (after the search: it adds the best-in-hindsight curve)
#       bench_t2i     benchmarks/bench_eval.py --bench conditional,conditional_overhead, while budget is left
#     The steps before t2i_hindsight keep GPU_CHECK_T2I_RESERVE_S of the budget for it and the report (default 90).
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh       # any part end to end on the CPU with tiny sizes (no budget)
#
# Output in $OUT: summary.txt (the figures, the table of steps and the verdict; also printed at the end) and
# gpu_check.tar.gz (every step's log, the script's own log, steps.tsv, the tests' junit XML and the runs'
# small files). While the script runs (or if it is killed) the loose logs are in $OUT/logs/.
#
# Environment:
#   OUT                 output folder (default ./gpu_out)
#   GPU_CHECK_BUDGET    seconds for the whole part (0: none). Each step's limit is cut to what is left; a step
#                       that would start with less than GPU_CHECK_MIN_STEP_S (default 20) left is not started
#                       (cut). The preflight is not counted against it.
#   GPU_CHECK_STEPS     comma list: run only these steps (e.g. ref_stats,one_seed to redo cut steps)
#   GPU_CHECK_TESTS     the tests step's pytest arguments (default: -m cuda tests; tiny: the CPU tests of the
#                       GPU-path modules)
#   GPU_CHECK_FAIL      comma list of steps given an argument their command rejects (checks that a failing
#                       step fails the script: tests/system/test_gpu_check.py)
#   T_<STEP>            one step's limit in seconds (T_PREFLIGHT, T_TESTS, T_PLAN, T_REF_STATS, T_ONE_SEED,
#                       T_BENCH_LAWA, T_BENCH_FID, T_BENCH_EVAL, T_SEEDS (each of the three), T_REPORT, T_T2I_DATA,
#                       T_T2I_PIPE, T_T2I_TRAIN, T_T2I_HINDSIGHT, T_T2I_REPORT, T_BENCH_T2I)
# Expects: $LAWA_DATA (or the Debian package's folder) with Fashion-MNIST, $LAWA_INCEPTION_WEIGHTS (or
# `lawa-diffusion inception fetch` done before), diffusers and torch-fidelity importable (the preflight says; the
# text2image part also needs transformers and Fashion-MNIST's label files).
set -euo pipefail
OUT="${OUT:-gpu_out}"
LOGS="$OUT/logs"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
export LAWA_CACHE_DIR="${LAWA_CACHE_DIR:-/tmp/lawa-cache}"
RUNS="${RUNS:-/tmp/lawa-gpu-runs}"
PY="${PYTHON:-python3}"
TINY="${GPU_CHECK_TINY:-0}"
PART="${GPU_CHECK_PART:-figures}"
ONLY="${GPU_CHECK_STEPS:-}"
FAIL="${GPU_CHECK_FAIL:-}"
MIN_STEP_S="${GPU_CHECK_MIN_STEP_S:-20}"
REPORT_RESERVE_S=30  # of the budget, kept for the report after three seeds
case "$PART" in
  figures|seeds) CONFIG=configs/fashion_mnist_gpu.yaml ;;
  paper) CONFIG=configs/paper_regime_gpu.yaml ;;
  text2image) CONFIG=configs/text_to_image_gpu.yaml ;;
  *) echo "gpu_check: GPU_CHECK_PART must be figures, seeds, paper or text2image, got '$PART'" >&2; exit 2 ;;
esac
log() { echo "== $(date +%T) $*"; }

if [ "$TINY" = 1 ]; then
  DEVICE=cpu
  export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  BUDGET="${GPU_CHECK_BUDGET:-0}"
  ONE_SEED_RESERVE_S="${GPU_CHECK_ONE_SEED_RESERVE_S:-0}"
  # the CPU tests of the GPU-path modules (their CUDA tests are left out, not skipped)
  DEFAULT_TESTS='-m "not cuda and not slow" tests/engine/test_rings.py tests/engine/test_collectives.py
                 tests/engine/test_bench_lawa.py tests/training/test_fast_path.py'
  : "${T_PREFLIGHT:=120}" "${T_PLAN:=120}" "${T_TESTS:=600}" "${T_BENCH_LAWA:=300}" "${T_REF_STATS:=300}" \
    "${T_ONE_SEED:=600}" "${T_BENCH_FID:=300}" "${T_BENCH_EVAL:=600}" "${T_SEEDS:=900}" "${T_REPORT:=300}" \
    "${T_T2I_DATA:=120}" "${T_T2I_PIPE:=120}" "${T_T2I_TRAIN:=600}" "${T_T2I_HINDSIGHT:=300}" "${T_T2I_REPORT:=120}" \
    "${T_BENCH_T2I:=600}"
  # bench_lawa's size flags (the one line to adjust when its flags change)
  LAWA_ARGS=(--numel 2000000 --repeats 3 --train_repeats 1 --train_every 5)
  FID_ARGS=(--num-images 24 --reference-images 40 --batch-size 32 --kid-subsets 10 --only maths)
  SIZES=(--set model.block_out_channels=[8,16] --set model.layers_per_block=1 --set model.norm_num_groups=4
         --set model.down_block_types=[DownBlock2D,DownBlock2D] --set model.up_block_types=[UpBlock2D,UpBlock2D]
         --set train_batch_size=16 --set data.num_images=512 --set eval.num_samples=16 --set eval.batch_size=16
         --set eval.num_inference_steps=2 --set eval.reference_num_images=64 --set eval.kid_subsets=10
         --set eval.kid_subset_size=16)
  EVAL_ARGS=(--bench trainer,evaluation --warmup 2 --train-steps 5)
  RUN_SIZES=(--set max_train_steps=10 --set lawa.every_n_steps=5 --set eval.every_n_steps=10
             --set log_every_n_steps=5 --set checkpointing_steps=10)
  if [ "$PART" = paper ]; then
    RUN_SIZES=(--set max_train_steps=16 --set lawa.every_n_steps=2 --set eval.every_n_steps=8
               --set log_every_n_steps=4 --set checkpointing_steps=16
               --set "lawa_windows=[{name: lawa_k5, over: ema_short, k: 5, every_n_steps: 2},
                                    {name: lawa_k3, over: ema_short, k: 3, every_n_steps: 4}]")
  fi
  REF_ARGS=(--num-images 64)
  # the text2image part (configs/text_to_image_cpu.yaml: a 0.2M-parameter UNet on 16x16 images)
  T2I_RESERVE_S=0
  T2I_PIPE_CONFIG=configs/text_to_image_cpu.yaml
  T2I_DATA_ARGS=(--num-train 64 --num-test 8 --image-size 16)
  T2I_SCRIPT_ARGS=(--resolution 16 --train_batch_size 8 --max_train_steps 12 --checkpointing_steps 12
                   --learning_rate 1e-3)
  T2I_PLUGIN_ARGS=(--lawa_k 3 --lawa_every_n_steps 2 --lawa_fid_every_n_steps 6 --lawa_fid_num_reference 8
                   --lawa_fid_num_samples 8 --lawa_fid_batch_size 8 --lawa_fid_num_inference_steps 2
                   --lawa_posthoc_every_n_steps 3)
  T2I_HINDSIGHT_ARGS=(--sigma-rel 0.05,0.1 --steps 12)
  T2I_BENCH_ARGS=(--bench conditional,conditional_overhead)
else
  DEVICE=cuda
  BUDGET="${GPU_CHECK_BUDGET:-400}"
  ONE_SEED_RESERVE_S="${GPU_CHECK_ONE_SEED_RESERVE_S:-240}"
  DEFAULT_TESTS='-m cuda tests'
  # Limits with room over what was measured on an H200 (one seed alone: 207 s; CUDA tests ~30 s before the
  # compiled-trainer checks; three seeds at once had not finished in 340 s); the budget cuts them further.
  : "${T_PREFLIGHT:=90}" "${T_PLAN:=60}" "${T_TESTS:=180}" "${T_BENCH_LAWA:=150}" "${T_REF_STATS:=90}" \
    "${T_ONE_SEED:=330}" "${T_BENCH_FID:=60}" "${T_BENCH_EVAL:=150}" "${T_SEEDS:=600}" "${T_REPORT:=60}"
  # bench_lawa's size flags (the one line to adjust when its flags change)
  LAWA_ARGS=(--train_repeats 3)
  FID_ARGS=(--num-images 5000 --reference-images 5000 --batch-size 1250 --only maths)
  SIZES=()
  EVAL_ARGS=(--bench trainer --warmup 15 --train-steps 150)  # evaluation: see the runs' lines
  RUN_SIZES=()
  REF_ARGS=(--batch-size 1250)
  # the text2image part: sizes not yet measured on a GPU (estimated: about 3 minutes in all, the run about 2)
  T2I_RESERVE_S="${GPU_CHECK_T2I_RESERVE_S:-90}"
  : "${T_T2I_DATA:=90}" "${T_T2I_PIPE:=60}" "${T_T2I_TRAIN:=300}" "${T_T2I_HINDSIGHT:=120}" "${T_T2I_REPORT:=60}" \
    "${T_BENCH_T2I:=180}"
  T2I_PIPE_CONFIG=configs/text_to_image_gpu.yaml
  T2I_DATA_ARGS=(--num-train 20000 --num-test 2000 --image-size 32)
  T2I_SCRIPT_ARGS=(--resolution 32 --train_batch_size 64 --max_train_steps 1000 --checkpointing_steps 500
                   --learning_rate 3e-4 --lr_scheduler constant_with_warmup --lr_warmup_steps 50
                   --mixed_precision bf16 --allow_tf32 --dataloader_num_workers 4)
  T2I_PLUGIN_ARGS=(--lawa_k 5 --lawa_every_n_steps 50 --lawa_fid_every_n_steps 250 --lawa_fid_num_reference 2000
                   --lawa_fid_num_samples 1000 --lawa_fid_batch_size 500 --lawa_fid_num_inference_steps 20
                   --lawa_posthoc_every_n_steps 100)
  T2I_HINDSIGHT_ARGS=(--sigma-rel 0.05,0.08,0.12 --steps 500,1000)
  T2I_BENCH_ARGS=(--bench conditional,conditional_overhead)
fi
eval "TESTS=(${GPU_CHECK_TESTS:-$DEFAULT_TESTS})"
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: GPU_CHECK_BUDGET must be a whole number of seconds, got '$BUDGET'" >&2; exit 2; }
mkdir -p "$LOGS"
exec > >(tee "$OUT/gpu_check.log") 2>&1

SUMMARY="$OUT/steps.tsv"   # step, status, exit code, seconds, limit, note
: > "$SUMMARY"
START=$SECONDS
RESERVE_S=0  # seconds of the budget the current step must leave to those after it

selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

record() {  # record NAME STATUS EXIT SECONDS LIMIT NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$SUMMARY"
}

step() {  # step NAME LIMIT_S COMMAND...: COMMAND under its limit (cut to the budget left), output in $LOGS/NAME.log
  local name=$1 limit=$2 own=$2 rc=0 t0 status note="" cut=0
  shift 2
  if [ "$name" != preflight ]; then selected "$name" || return 0; fi
  if [[ ",$FAIL," == *",$name,"* ]]; then set -- "$@" --gpu-check-rejected-argument; fi
  if [ "$BUDGET" -gt 0 ] && [ "$name" != preflight ]; then
    local left=$(( BUDGET - (SECONDS - START) - RESERVE_S ))
    if [ "$left" -lt "$MIN_STEP_S" ]; then
      log "$name: cut, not started: ${left} s left of GPU_CHECK_BUDGET=${BUDGET} (${RESERVE_S} s kept for later steps)"
      record "$name" cut - 0 "$own" "not started: ${left} s left of the budget"
      return 0
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; cut=1; fi
  fi
  log "$name (limit $limit s): $*"
  t0=$SECONDS
  timeout -k 15 "$limit" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    status=passed
  elif { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "$cut" -eq 1 ]; then
    status=cut note="stopped at ${limit} s: the budget had cut its limit of ${own} s"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=failed note="ran past its own limit of ${own} s (a hang, or far slower than measured)"
  else
    status=failed note="exit $rc"
  fi
  record "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" "$note"
  if [ "$status" = passed ]; then
    log "$name: passed in $((SECONDS - t0)) s"
  else
    log "$name: $status, $note, after $((SECONDS - t0)) s; its last lines:"
    tr '\r' '\n' < "$LOGS/$name.log" | tail -n 25
  fi
}

status_of() { awk -F'\t' -v n="$1" '$1 == n { s = $2 } END { print s }' "$SUMMARY"; }
passed() { [ "$(status_of "$1")" = passed ]; }

fail_on_skips() {  # fail_on_skips NAME JUNIT_XML: a passed tests step with skipped tests becomes failed
  passed "$1" || return 0
  local skipped note
  skipped=$(grep -o 'skipped="[0-9]*"' "$2" 2>/dev/null | head -n 1 | tr -dc '0-9' || true)
  if [ -z "$skipped" ]; then
    note="pytest wrote no junit XML to count skipped tests in"
  elif [ "$skipped" != 0 ]; then
    note="$skipped test(s) skipped: a skipped CUDA test checks nothing"
  else
    return 0
  fi
  awk -F'\t' -v OFS='\t' -v n="$1" -v note="$note" '$1 == n { $2 = "failed"; $6 = note } { print }' \
    "$SUMMARY" > "$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
  log "$1: failed, $note"
  grep -aE "^SKIPPED" "$LOGS/$1.log" | head -n 10 || true
}

show() {  # show NAME EXTENDED-REGEX [LINES]: the matching lines of a step's log, when it passed (a failed step's
  passed "$1" || return 0  # last lines were shown already)
  tr '\r' '\n' < "$LOGS/$1.log" | grep -aE "$2" | tail -n "${3:-20}" || true
}

show_run() {  # show_run NAME: a training step's evaluation lines, warnings, errors and last step rate (also when it
  [ -f "$LOGS/$1.log" ] || return 0  # was cut off: the figures it reached)
  tr '\r' '\n' < "$LOGS/$1.log" | grep -aE "^step [0-9]+:|^done|rror|warning" | tail -n 12 || true
  tr '\r' '\n' < "$LOGS/$1.log" | grep -aoE "[0-9.]+(step/s|s/step)" | tail -n 1 | sed "s/^/last rate: /" || true
}

train() {  # train NAME SEED LIMIT_S: one run of $CONFIG into $RUNS/NAME
  step "$1" "$3" $PY -m lawa_diffusion train --config "$CONFIG" "${SIZES[@]}" "${RUN_SIZES[@]}" --set seed="$2" \
    --output-dir "$RUNS/$1" --overwrite
}

three_seeds() {  # seeds 0, 1, 2 of $CONFIG at once on the one device (each its own step), then their report
  local threads=$(( $(nproc) / 3 )) limit=$T_SEEDS
  [ "$threads" -ge 1 ] || threads=1
  if [ "$BUDGET" -gt 0 ]; then  # leave the report its time: it reads whatever the runs reached
    local left=$(( BUDGET - (SECONDS - START) - REPORT_RESERVE_S ))
    if [ "$left" -lt "$limit" ]; then limit=$(( left > MIN_STEP_S ? left : MIN_STEP_S )); fi
  fi
  local pids=()
  for s in 0 1 2; do
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads train "seed$s" "$s" "$limit" &
    pids+=($!)
  done
  wait "${pids[@]}"  # (a bare wait would also wait for the tee of this script's output, which never ends)
  for s in 0 1 2; do show_run "seed$s" | sed "s/^/seed$s: /"; done
  step report "$T_REPORT" $PY -m lawa_diffusion report "$RUNS/seed0" "$RUNS/seed1" "$RUNS/seed2" -o "$RUNS/report" \
    --overwrite
  show report "." 40
}

cuda_tests() {  # the tests step, with a junit XML whose skipped count decides too
  step tests "$T_TESTS" $PY -m pytest -q -p no:cacheprovider -rfEs --junitxml "$LOGS/tests.xml" "${TESTS[@]}"
  if selected tests; then fail_on_skips tests "$LOGS/tests.xml"; fi
  show tests "passed|failed|error|skipped" 12
}

text_to_image() {  # the text2image part: data, pipeline, a plugin run, its search in hindsight and its report
  local data="$RUNS/t2i_data" pipe="$RUNS/t2i_pipe" run="$RUNS/t2i_run"
  RESERVE_S=$T2I_RESERVE_S  # the run's search in hindsight and report keep their time
  step t2i_data "$T_T2I_DATA" $PY scripts/make_caption_folder.py --output "$data" "${T2I_DATA_ARGS[@]}"
  show t2i_data "images"
  step t2i_pipe "$T_T2I_PIPE" $PY scripts/make_tiny_pipeline.py --config "$T2I_PIPE_CONFIG" --words-from "$data/train" \
    --output "$pipe"
  show t2i_pipe "parameters"
  step t2i_train "$T_T2I_TRAIN" $PY -m lawa_diffusion.launch "${T2I_PLUGIN_ARGS[@]}" --lawa_fid_prompts "$data/test" \
    scripts/train_text_to_image.py --pretrained_model_name_or_path "$pipe" --train_data_dir "$data/train" \
    --output_dir "$run" --use_ema --seed 0 "${T2I_SCRIPT_ARGS[@]}"
  show_t2i_run
  RESERVE_S=$REPORT_RESERVE_S
  step t2i_hindsight "$T_T2I_HINDSIGHT" $PY -m lawa_diffusion hindsight "$run" "${T2I_HINDSIGHT_ARGS[@]}" --overwrite
  show t2i_hindsight "^step [0-9]+:|^hindsight:"
  RESERVE_S=0
  step t2i_report "$T_T2I_REPORT" $PY -m lawa_diffusion report "$run"
  show t2i_report "." 40
  step bench_t2i "$T_BENCH_T2I" $PY benchmarks/bench_eval.py --device "$DEVICE" "${T2I_BENCH_ARGS[@]}"
  show bench_t2i "^\{" 4
}

show_t2i_run() {  # the plugin run's lag plan, evaluation lines, step rate, warnings and errors (also when it was cut off)
  [ -f "$LOGS/t2i_train.log" ] || return 0
  tr '\r' '\n' < "$LOGS/t2i_train.log" | grep -aoE "lag plan: .*|step [0-9]+: FID .*|^done: .*|.*rror.*|.*warning.*" | tail -n 12 \
    || true
}

log "part $PART on $DEVICE, budget ${BUDGET} s (0: none), output in $OUT"
if [ "$DEVICE" = cuda ]; then nvidia-smi -L || true; fi
rm -rf "$RUNS"
mkdir -p "$RUNS"
step preflight "$T_PREFLIGHT" $PY scripts/gpu_preflight.py --device "$DEVICE" --part "$PART"
show preflight "^preflight"  # (when it failed, its last lines were shown)
START=$SECONDS  # the budget is for the steps after the preflight

if passed preflight; then
  case "$PART" in
  figures)
    RESERVE_S=$ONE_SEED_RESERVE_S  # the steps before the training run leave it its time
    cuda_tests
    step plan "$T_PLAN" $PY -m lawa_diffusion plan --config "$CONFIG" "${SIZES[@]}" "${RUN_SIZES[@]}"
    show plan "." 8
    step ref_stats "$T_REF_STATS" $PY -m lawa_diffusion ref-stats fashion-mnist:test --image-size 32 --device "$DEVICE" \
      "${REF_ARGS[@]}"
    show ref_stats "." 2
    RESERVE_S=0
    train one_seed 9 "$T_ONE_SEED"
    show_run one_seed
    # (the text-to-image run is a part of its own: GPU_CHECK_PART=text2image)
    step bench_lawa "$T_BENCH_LAWA" $PY benchmarks/bench_lawa.py --device "$DEVICE" "${LAWA_ARGS[@]}"
    show bench_lawa "^\{" 16
    step bench_fid "$T_BENCH_FID" $PY benchmarks/bench_fid.py --device "$DEVICE" "${FID_ARGS[@]}"
    show bench_fid "^\{" 4
    step bench_eval "$T_BENCH_EVAL" $PY benchmarks/bench_eval.py --device "$DEVICE" --config "$CONFIG" "${SIZES[@]}" \
      "${EVAL_ARGS[@]}"
    show bench_eval "^\{" 4
    ;;
  seeds)
    step ref_stats "$T_REF_STATS" $PY -m lawa_diffusion ref-stats fashion-mnist:test --image-size 32 --device "$DEVICE" \
      "${REF_ARGS[@]}"
    three_seeds
    ;;
  paper)
    step ref_stats "$T_REF_STATS" $PY -m lawa_diffusion ref-stats fashion-mnist:test --image-size 32 --device "$DEVICE" \
      "${REF_ARGS[@]}"
    step plan "$T_PLAN" $PY -m lawa_diffusion plan --config "$CONFIG" --window lawa_k5 --steps 1600,3200
    show plan "." 4
    three_seeds
    ;;
  text2image)
    text_to_image
    ;;
  esac
else
  log "stopped after the preflight: $(grep -a '^preflight failed' "$LOGS/preflight.log" | head -n 1 || echo "it did not finish")"
fi

{
  echo "== figures"
  for name in bench_lawa bench_fid bench_eval bench_t2i; do
    show "$name" '"bench": "(snapshot|average|pinned|train_step_overhead|metric_maths|trainer|trainer_speedup|evaluation|eval_conditional|conditional_fid_overhead)"'
  done
  if [ -f "$LOGS/t2i_train.log" ]; then
    echo "-- t2i_train"; show_t2i_run
    echo "-- t2i_hindsight"; show t2i_hindsight "^step [0-9]+:"
    echo "-- t2i_report"; show t2i_report "." 30
  fi
  for name in one_seed seed0 seed1 seed2; do
    if [ -f "$LOGS/$name.log" ]; then echo "-- $name"; show_run "$name"; fi
  done
  echo "== steps (part $PART on $DEVICE, ${SECONDS} s in all)"
  printf '%-12s %-8s %5s %8s %6s  %s\n' step status exit seconds limit note
  while IFS=$'\t' read -r name status rc secs limit note; do
    printf '%-12s %-8s %5s %8s %6s  %s\n' "$name" "$status" "$rc" "$secs" "$limit" "$note"
  done < "$SUMMARY"
  counts=$(awk -F'\t' '{ n[$2]++ } END { printf "%d passed, %d failed, %d cut", n["passed"], n["failed"], n["cut"] }' \
    "$SUMMARY")
  if awk -F'\t' '$2 == "failed" { f = 1 } END { exit !f }' "$SUMMARY"; then
    verdict=failed
  elif awk -F'\t' '$2 == "cut" { c = 1 } END { exit !c }' "$SUMMARY"; then
    verdict=incomplete
  else
    verdict=passed
  fi
  echo "gpu_check verdict: $verdict ($counts${ONLY:+; steps chosen: $ONLY})"
} | tee "$OUT/summary.txt"
verdict=$(sed -n 's/^gpu_check verdict: \([a-z]*\).*/\1/p' "$OUT/summary.txt")

# everything else in one archive: the logs, the table, the runs' small files (no checkpoints, snapshots, weights,
# nor the text2image part's data and pipeline)
if tar czf "$OUT/gpu_check.tar.gz" -C "$OUT" logs steps.tsv summary.txt gpu_check.log \
     -C "$(dirname "$RUNS")" --exclude='checkpoint-*' --exclude='ema_snapshots' --exclude='*.safetensors' \
     --exclude='t2i_data' --exclude='t2i_pipe' \
     --transform "s|^$(basename "$RUNS")|runs|" "$(basename "$RUNS")"; then
  rm -rf "$LOGS" "$SUMMARY" "$OUT/gpu_check.log"
  log "logs and runs in $OUT/gpu_check.tar.gz, the summary in $OUT/summary.txt"
else
  log "the archive could not be written; the loose logs stay in $LOGS"
fi
case "$verdict" in
  passed) exit 0 ;;
  incomplete) exit 3 ;;
  *) exit 1 ;;
esac
