#!/usr/bin/env bash
# The check on a CUDA machine, one call per part, each part inside a time budget (GPU_CHECK_BUDGET seconds,
# default 400: one device call of under 7 minutes with the payload's unpacking, so that a rerun still fits
# the lease). Every step runs under its own time limit, its whole output goes to $OUT/logs/<step>.log, its
# exit code and seconds are collected, and the script ends with a summary table (step, exit, seconds,
# limit) and exits non-zero when any step failed (a step cut off by its limit exits 124).
#
#   bash scripts/gpu_check.sh                        # GPU_CHECK_PART=figures, in this order (most valuable first):
#       device    versions and device name
#       plan      the lag plan of configs/fashion_mnist_gpu.yaml
#       tests     the tests marked cuda (pytest -m cuda tests)
#       bench_lawa   snapshot / average rows against their copy bounds, training-step overhead
#       ref_stats    the reference statistics the runs use (cached)
#       one_seed     configs/fashion_mnist_gpu.yaml, one seed alone: its evaluation lines, step rate, wall time
#       bench_fid    FID/KID maths on the device vs torch-fidelity on the CPU
#       bench_eval   trainer steps/s with the fast path off and on
#   GPU_CHECK_PART=seeds bash scripts/gpu_check.sh   # three seeds of the same config at once, and their report
#   GPU_CHECK_PART=paper bash scripts/gpu_check.sh   # configs/paper_regime_gpu.yaml: plan, three seeds at
#       once and their report
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh       # any part end to end on the CPU with tiny sizes (no budget)
#
# Environment:
#   OUT                 where logs, the summary, figures.txt and runs.tar.gz go (default ./gpu_out)
#   GPU_CHECK_BUDGET    seconds for the whole part (0: none). Each step's limit is cut to what is left; a step
#                       that would start with less than GPU_CHECK_MIN_STEP_S (default 20) left is skipped and
#                       listed as skipped. Measured on an H200 (see the GPU notes): one seed alone 207 s.
#   GPU_CHECK_STEPS     comma list: run only these steps (e.g. ref_stats,one_seed to redo a cut-off run)
#   GPU_CHECK_FAIL      comma list of steps given an argument their command rejects (checks that a failing
#                       step fails the script: tests/system/test_gpu_check.py)
#   T_<STEP>            one step's limit in seconds (T_DEVICE, T_PLAN, T_TESTS, T_BENCH_LAWA, T_REF_STATS,
#                       T_ONE_SEED, T_BENCH_FID, T_BENCH_EVAL, T_SEEDS (each of the three), T_REPORT)
# Expects: diffusers/torch-fidelity importable, Fashion-MNIST in $LAWA_DATA (or the Debian package's
# folder), Inception weights via $LAWA_INCEPTION_WEIGHTS (or `lawa-diffusion inception fetch` done before).
set -euo pipefail
OUT="${OUT:-gpu_out}"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
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
  *) echo "gpu_check: GPU_CHECK_PART must be figures, seeds or paper, got '$PART'" >&2; exit 2 ;;
esac
log() { echo "== $(date +%T) $*"; }

if [ "$TINY" = 1 ]; then
  DEVICE=cpu
  export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  BUDGET="${GPU_CHECK_BUDGET:-0}"
  TESTS=(tests/training/test_fast_path.py tests/engine/test_cuda.py)  # the CUDA ones skip; the fast path's CPU tests run
  : "${T_DEVICE:=120}" "${T_PLAN:=120}" "${T_TESTS:=600}" "${T_BENCH_LAWA:=300}" "${T_REF_STATS:=300}" \
    "${T_ONE_SEED:=600}" "${T_BENCH_FID:=300}" "${T_BENCH_EVAL:=600}" "${T_SEEDS:=900}" "${T_REPORT:=300}"
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
else
  DEVICE=cuda
  BUDGET="${GPU_CHECK_BUDGET:-400}"
  TESTS=(-m cuda tests)
  # Limits with room over what was measured on an H200 (one seed alone: 207 s; CUDA tests ~30 s before the
  # compiled-trainer checks; three seeds at once had not finished in 340 s); the budget cuts them further.
  : "${T_DEVICE:=60}" "${T_PLAN:=60}" "${T_TESTS:=180}" "${T_BENCH_LAWA:=150}" "${T_REF_STATS:=90}" \
    "${T_ONE_SEED:=330}" "${T_BENCH_FID:=60}" "${T_BENCH_EVAL:=150}" "${T_SEEDS:=600}" "${T_REPORT:=60}"
  # bench_lawa's size flags (the one line to adjust when its flags change)
  LAWA_ARGS=(--train_repeats 3)
  FID_ARGS=(--num-images 5000 --reference-images 5000 --batch-size 1250 --only maths)
  SIZES=()
  EVAL_ARGS=(--bench trainer --warmup 15 --train-steps 150)  # evaluation: see the runs' lines
  RUN_SIZES=()
  REF_ARGS=(--batch-size 1250)
fi
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: GPU_CHECK_BUDGET must be a whole number of seconds, got '$BUDGET'" >&2; exit 2; }
exec > >(tee "$OUT/gpu_check.log") 2>&1

SUMMARY="$OUT/steps.tsv"   # step, exit code (or "skipped"), seconds, limit
: > "$SUMMARY"
START=$SECONDS

selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

step() {  # step NAME LIMIT_S COMMAND...: COMMAND under its limit (cut to the budget left), output in $LOGS/NAME.log
  local name=$1 limit=$2 rc=0 t0
  shift 2
  selected "$name" || return 0
  if [[ ",$FAIL," == *",$name,"* ]]; then set -- "$@" --gpu-check-rejected-argument; fi
  if [ "$BUDGET" -gt 0 ]; then
    local left=$(( BUDGET - (SECONDS - START) ))
    if [ "$left" -lt "$MIN_STEP_S" ]; then
      log "$name: skipped, ${left} s left of GPU_CHECK_BUDGET=${BUDGET}"
      printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$SUMMARY"
      return 0
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  log "$name (limit $limit s): $*"
  t0=$SECONDS
  timeout -k 15 "$limit" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" >> "$SUMMARY"
  if [ "$rc" -ne 0 ]; then
    local why=""
    if [ "$rc" -eq 124 ]; then why=" (cut off by its limit)"; fi
    log "$name: FAILED, exit $rc after $((SECONDS - t0)) s$why; its last lines:"
    tr '\r' '\n' < "$LOGS/$name.log" | tail -n 25
  else
    log "$name: exit 0 after $((SECONDS - t0)) s"
  fi
}

passed() { grep -q "^$1"$'\t'"0"$'\t' "$SUMMARY"; }

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

log "part $PART on $DEVICE, budget ${BUDGET} s (0: none), output in $OUT"
if [ "$DEVICE" = cuda ]; then nvidia-smi -L || true; fi
step device "$T_DEVICE" $PY -c "import argparse, sys; argparse.ArgumentParser(prog='device').parse_args()
import torch, diffusers, torch_fidelity
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'torch-fidelity', torch_fidelity.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
show device "."
rm -rf "$RUNS"
mkdir -p "$RUNS"

case "$PART" in
figures)
  step plan "$T_PLAN" $PY -m lawa_diffusion plan --config "$CONFIG" "${SIZES[@]}" "${RUN_SIZES[@]}"
  show plan "." 8
  step tests "$T_TESTS" $PY -m pytest -q -p no:cacheprovider -rfE "${TESTS[@]}"
  show tests "passed|failed|error|skipped" 12
  step bench_lawa "$T_BENCH_LAWA" $PY benchmarks/bench_lawa.py --device "$DEVICE" "${LAWA_ARGS[@]}"
  show bench_lawa "^\{" 16
  step ref_stats "$T_REF_STATS" $PY -m lawa_diffusion ref-stats fashion-mnist:test --image-size 32 --device "$DEVICE" \
    "${REF_ARGS[@]}"
  show ref_stats "." 2
  train one_seed 9 "$T_ONE_SEED"
  show_run one_seed
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
esac

{
  echo "== figures"
  for name in bench_lawa bench_fid bench_eval; do
    show "$name" '"bench": "(snapshot|average|pinned|train_step_overhead|metric_maths|trainer|trainer_speedup|evaluation)"'
  done
  for name in one_seed seed0 seed1 seed2; do
    if [ -f "$LOGS/$name.log" ]; then echo "-- $name"; show_run "$name"; fi
  done
} | tee "$OUT/figures.txt"
tar czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='checkpoint-*' --exclude='ema_snapshots' . 2>/dev/null || true

failed=0
log "summary (part $PART, ${SECONDS} s in all; logs in $LOGS)"
printf '%-12s %8s %8s %6s\n' step exit seconds limit
while IFS=$'\t' read -r name rc secs limit; do
  note=""
  if [ "$rc" = skipped ]; then
    note="  (no time left in the budget)"
  elif [ "$rc" -ne 0 ]; then
    failed=1
    note="  FAILED"
    if [ "$rc" -eq 124 ]; then note="  FAILED, cut off by its limit"; fi
  fi
  printf '%-12s %8s %8s %6s%s\n' "$name" "$rc" "$secs" "$limit" "$note"
done < "$SUMMARY"
if [ "$failed" -ne 0 ]; then
  log "gpu_check: some steps failed"
  exit 1
fi
log "gpu_check: every step that ran passed"
