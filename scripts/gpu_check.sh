#!/usr/bin/env bash
# One-shot check on a CUDA machine: CUDA tests, both benchmarks, and the 3-seed GPU experiment
# (configs/fashion_mnist_gpu.yaml) with its report. Writes everything under $OUT (default ./gpu_out).
# Expects: diffusers/torch-fidelity importable (or wheels in .whl/), Fashion-MNIST in $LAWA_DATA,
# Inception weights via $LAWA_INCEPTION_WEIGHTS (or `lawa-diffusion inception fetch` done before).
set -u
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
export LAWA_CACHE_DIR="${LAWA_CACHE_DIR:-/tmp/lawa-cache}"
RUNS="${RUNS:-/tmp/lawa-gpu-runs}"
log() { echo "== $(date +%T) $*"; }
{
log "device"; nvidia-smi -L; python3 -c "import torch, diffusers, torch_fidelity; print(torch.__version__, diffusers.__version__, torch_fidelity.__version__, torch.cuda.get_device_name())"

log "CUDA tests + engine tests"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_lawa.py tests/test_ema.py -x 2>&1 | tail -n 15

log "bench_lawa"
timeout 80 python3 benchmarks/bench_lawa.py --device cuda --train_repeats 3 2>&1 | tail -n 12

log "bench_fid"
timeout 70 python3 benchmarks/bench_fid.py --device cuda --num-images 2000 --reference-images 5000 --batch-size 250 2>&1 | tail -n 4

log "bench_eval"
timeout 90 python3 benchmarks/bench_eval.py --device cuda --steps 400 --eval-every 200 --num-samples 2000 2>&1 | tail -n 1

log "reference statistics (cached for the three seeds)"
timeout 60 python3 -m lawa_diffusion ref-stats fashion-mnist:test --image-size 32 2>&1 | tail -n 3

log "experiment: 3 seeds concurrently on the one GPU"
rm -rf "$RUNS"; mkdir -p "$RUNS"
# Three processes share the machine's cores: cap each one's BLAS/OpenMP threads so the CPU-side
# FID/KID maths (scipy sqrtm, KID subsets) do not oversubscribe them (suspected cause of slow evaluations).
threads=$(( $(nproc) / 3 )); [ "$threads" -ge 1 ] || threads=1
for s in 0 1 2; do
  OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads timeout 300 python3 -m lawa_diffusion train --config configs/fashion_mnist_gpu.yaml --set seed=$s \
    --output-dir "$RUNS/seed$s" > "$RUNS/train_seed$s.log" 2>&1 &
done
wait
for s in 0 1 2; do echo "-- seed $s"; grep -E "^step [0-9]+:|done|rror" "$RUNS/train_seed$s.log" | tail -n 12; done

log "report"
timeout 60 python3 -m lawa_diffusion report "$RUNS/seed0" "$RUNS/seed1" "$RUNS/seed2" -o "$RUNS/report" 2>&1 | tail -n 40
log "end"
} 2>&1 | tee "$OUT/gpu_check.log"
tar czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='checkpoint-*' --exclude='ema_snapshots' . 2>/dev/null || true
