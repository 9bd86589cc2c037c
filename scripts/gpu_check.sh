#!/usr/bin/env bash
# One-shot check on a CUDA machine, in one call of at most 8 minutes (the time limits below add up to 475 s):
# CUDA tests, bench_lawa, bench_fid (FID/KID maths), bench_eval (trainer steps/s, fast path off and on),
# then configs/fashion_mnist_gpu.yaml: one seed alone (its evaluation lines give each evaluation's
# sampling and metric seconds) and three seeds at once on the one GPU, and their report. Ends with the
# figures, one per line.
# Writes everything under $OUT (default ./gpu_out).
#   bash scripts/gpu_check.sh                    # on the GPU machine (see the GPU notes for the payload)
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh   # every step end to end on the CPU with tiny sizes (minutes)
# Expects: diffusers/torch-fidelity importable, Fashion-MNIST in $LAWA_DATA (or the Debian package's
# folder), Inception weights via $LAWA_INCEPTION_WEIGHTS (or `lawa-diffusion inception fetch` done before).
# Each step's time limit can be changed with T_<STEP>=seconds (T_TESTS, T_LAWA, T_FID, T_EVAL, T_REF,
# T_ALONE, T_THREE, T_REPORT).
#   GPU_CHECK_PART=paper bash scripts/gpu_check.sh   # instead: the paper-regime experiment,
#       configs/paper_regime_gpu.yaml, three seeds at once and their report (limit T_PAPER, default 420 s),
#       in one device call of its own (with GPU_CHECK_TINY=1: the same end to end on the CPU, tiny)
set -u
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
export LAWA_CACHE_DIR="${LAWA_CACHE_DIR:-/tmp/lawa-cache}"
RUNS="${RUNS:-/tmp/lawa-gpu-runs}"
PY="${PYTHON:-python3}"
TINY="${GPU_CHECK_TINY:-0}"
PART="${GPU_CHECK_PART:-figures}"
case "$PART" in
  figures) CONFIG=configs/fashion_mnist_gpu.yaml ;;
  paper) CONFIG=configs/paper_regime_gpu.yaml ;;
  *) echo "gpu_check: GPU_CHECK_PART must be figures or paper, got '$PART'" >&2; exit 2 ;;
esac
log() { echo "== $(date +%T) $*"; }

if [ "$TINY" = 1 ]; then
  DEVICE=cpu
  export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  TESTS="tests/test_metric_maths.py tests/test_fast_path.py tests/test_cuda.py"
  : "${T_TESTS:=300}" "${T_LAWA:=240}" "${T_FID:=240}" "${T_EVAL:=400}" "${T_REF:=120}" "${T_ALONE:=240}" \
    "${T_THREE:=400}" "${T_REPORT:=120}"
  # bench_lawa's size flags (the one line to adjust when its flags change)
  LAWA_ARGS="--numel 2000000 --repeats 3 --train_repeats 1 --train_every 5"
  FID_ARGS="--num-images 24 --reference-images 40 --batch-size 32 --kid-subsets 10 --only maths"
  SIZES=(--set model.block_out_channels=[8,16] --set model.layers_per_block=1 --set model.norm_num_groups=4
         --set model.down_block_types=[DownBlock2D,DownBlock2D] --set model.up_block_types=[UpBlock2D,UpBlock2D]
         --set train_batch_size=16 --set data.num_images=512 --set eval.num_samples=16 --set eval.batch_size=16
         --set eval.num_inference_steps=2 --set eval.reference_num_images=64 --set eval.kid_subsets=10
         --set eval.kid_subset_size=16)
  EVAL_ARGS="--bench trainer,evaluation --warmup 2 --train-steps 5"
  RUN_SIZES=(--set max_train_steps=10 --set lawa.every_n_steps=5 --set eval.every_n_steps=10
             --set log_every_n_steps=5 --set checkpointing_steps=10)
  if [ "$PART" = paper ]; then
    RUN_SIZES=(--set max_train_steps=16 --set lawa.every_n_steps=2 --set eval.every_n_steps=8
               --set log_every_n_steps=4 --set checkpointing_steps=16
               --set "lawa_windows=[{name: lawa_k5, over: ema_short, k: 5, every_n_steps: 2},
                                    {name: lawa_k3, over: ema_short, k: 3, every_n_steps: 4}]")
  fi
  : "${T_PAPER:=600}"
  REF_ARGS="--num-images 64"
else
  DEVICE=cuda
  TESTS="tests/test_cuda.py tests/test_fast_path.py tests/test_metric_maths.py"
  : "${T_TESTS:=50}" "${T_LAWA:=90}" "${T_FID:=25}" "${T_EVAL:=65}" "${T_REF:=20}" "${T_ALONE:=90}" \
    "${T_THREE:=120}" "${T_REPORT:=15}"
  # bench_lawa's size flags (the one line to adjust when its flags change)
  LAWA_ARGS="--train_repeats 3"
  FID_ARGS="--num-images 5000 --reference-images 5000 --batch-size 1250 --only maths"
  SIZES=()
  EVAL_ARGS="--bench trainer --warmup 15 --train-steps 150"  # evaluation: see the runs' lines
  RUN_SIZES=()
  : "${T_PAPER:=420}"
  REF_ARGS="--batch-size 1250"
fi

train() {  # train SEED LIMIT_S: one run of $CONFIG into $RUNS/seed<SEED>, log in $RUNS/train_seed<SEED>.log
  local start=$SECONDS
  timeout "$2" $PY -m lawa_diffusion train --config "$CONFIG" "${SIZES[@]}" "${RUN_SIZES[@]}" --set seed="$1" \
    --output-dir "$RUNS/seed$1" > "$RUNS/train_seed$1.log" 2>&1
  echo "seed $1: exit $? after $((SECONDS - start)) s" >> "$RUNS/walls.txt"
}
show() {  # the evaluation lines, warnings, errors and wall time of seed $1 (progress bars dropped)
  tr '\r' '\n' < "$RUNS/train_seed$1.log" | grep -aE "^step [0-9]+:|^done|rror|warning" | tail -n 10
  tr '\r' '\n' < "$RUNS/train_seed$1.log" | grep -aoE "[0-9.]+(step/s|s/step)" | tail -n 1 | sed "s/^/last rate: /"
  grep -a "^seed $1:" "$RUNS/walls.txt" | tail -n 1
}

device_line() {
log "device ($DEVICE)"
if [ "$DEVICE" = cuda ]; then nvidia-smi -L; fi
$PY -c "import torch, diffusers, torch_fidelity; print(torch.__version__, diffusers.__version__, torch_fidelity.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
}
reference() {
log "reference statistics (cached for the runs; limit ${T_REF} s)"
timeout "$T_REF" $PY -m lawa_diffusion ref-stats fashion-mnist:test --image-size 32 --device "$DEVICE" $REF_ARGS 2>&1 | tail -n 2
}
three_seeds() {  # three_seeds LIMIT_S: seeds 0, 1, 2 of $CONFIG at once on the one device, then their report
# Three processes share the machine's cores: cap each one's BLAS/OpenMP threads.
threads=$(( $(nproc) / 3 )); [ "$threads" -ge 1 ] || threads=1
for s in 0 1 2; do OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads train "$s" "$1" & done
wait
for s in 0 1 2; do echo "-- seed $s"; show "$s"; done
log "report (limit ${T_REPORT} s)"
timeout "$T_REPORT" $PY -m lawa_diffusion report "$RUNS/seed0" "$RUNS/seed1" "$RUNS/seed2" -o "$RUNS/report" 2>&1 | tail -n 40
}
figures() {
log "tests: $TESTS (limit ${T_TESTS} s)"
timeout "$T_TESTS" $PY -m pytest -q -p no:cacheprovider $TESTS -x 2>&1 | tail -n 6

log "bench_lawa (limit ${T_LAWA} s)"
timeout "$T_LAWA" $PY benchmarks/bench_lawa.py --device "$DEVICE" $LAWA_ARGS 2>&1 | grep '^{' | tail -n 14

log "bench_fid: metric maths on the device vs torch-fidelity on the CPU (limit ${T_FID} s)"
timeout "$T_FID" $PY benchmarks/bench_fid.py --device "$DEVICE" $FID_ARGS 2>&1 | grep '^{' | tail -n 2

log "bench_eval: trainer fast path off/on (limit ${T_EVAL} s)"
timeout "$T_EVAL" $PY benchmarks/bench_eval.py --device "$DEVICE" --config "$CONFIG" \
  "${SIZES[@]}" $EVAL_ARGS 2>&1 | grep '^{' | tail -n 4

reference
rm -rf "$RUNS"; mkdir -p "$RUNS"

log "one seed alone: $CONFIG (limit ${T_ALONE} s; goal <= 90 s)"
rm -rf "$RUNS/seed9"; train 9 "$T_ALONE"; show 9

log "three seeds at once on the one device (limit ${T_THREE} s; goal <= 240 s)"
three_seeds "$T_THREE"
}
paper() {
reference
rm -rf "$RUNS"; mkdir -p "$RUNS"
log "paper regime: $CONFIG, three seeds at once (limit ${T_PAPER} s)"
$PY -m lawa_diffusion plan --config "$CONFIG" --window lawa_k5 --steps 1600,3200 2>&1 | tail -n 2
three_seeds "$T_PAPER"
}

{
device_line
"$PART"
log "end"
} 2>&1 | tee "$OUT/gpu_check.log"

{
echo "== figures"
grep -aE '"bench": "(snapshot|average|train_step_overhead|metric_maths|trainer|trainer_speedup|evaluation)"' "$OUT/gpu_check.log"
for s in 9 0 1 2; do [ -f "$RUNS/train_seed$s.log" ] && echo "-- seed $s" && show "$s"; done
} | tee "$OUT/figures.txt"
tar czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='checkpoint-*' --exclude='ema_snapshots' . 2>/dev/null || true
