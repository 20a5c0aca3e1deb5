#!/usr/bin/env bash
# The GPU checks of experiments/RESULTS.md, one prepared run on a machine with one GPU.
#
#   bash scripts/gpu_check.sh OUTDIR [SECONDS] [WORKDIR] [RESULTS]
#
# Runs, in order of priority, each under its own time limit and all within SECONDS (default
# 560), writing JSON figures and one log to OUTDIR (experiments/RESULTS.md section 12):
#   1. wall_clock.json: the MNIST MLP benchmark's held-out runs re-timed on the GPU
#      (scripts/benchmark_wall_clock.py; needs WORKDIR/mnist_mlp/metamd/divergence.npz and
#      the RESULTS it was benchmarked with: by default runs/bench_38, the current default's
#      benchmark run, and experiments/results/benchmark.json, whose MNIST entry is that run's;
#      carry runs/bench_38/mnist_mlp/metamd to the GPU machine);
#   1a. wall_clock_elapsed.json: Adam, MetaMD, low-rank MetaMD (eval.frozen_rank) and
#      adaptive MetaMD of item 1 timed to the step
#      where each run reaches Adam's loss (--elapsed), and runs of 1 to 100 steps
#      (--run-lengths: what a run pays once, its early and its late steps);
#   1b. wall_clock_blocks_128.json: item 1's adaptive MetaMD with Shampoo's statistics in
#      blocks of at most 128 rows instead of the default's rank-64 sketch (--set
#      adaptive_blend_block_size=128 --set adaptive_blend_sketch_rank=0; section 15), and Adam;
#   1c. wall_clock_whole.json: the same with Shampoo's whole statistics (--set
#      adaptive_blend_sketch_rank=0; the default before section 25), and Adam, also timed
#      to the step where each run reaches Adam's loss (--elapsed);
#   2. roots.json: the eigendecompositions of the Kronecker statistics' refresh, per
#      implementation (scripts/benchmark_roots.py);
#   3. meta_step_default.json: one meta-step of configs/default.py (its horizon and
#      meta-batch) on one GPU (scripts/benchmark_parallel.py);
#   4. step_transformer.json: the transformer's training step for MetaMD, adaptive MetaMD,
#      AdamW and Muon (scripts/benchmark_step.py);
#   5. meta_step_transformer.json: one meta-step of configs/transformer_lm.py on one GPU;
#   6. meta_step_default_cpu.json: item 3 on the same machine's CPU, for the GPU/CPU ratio;
#   7. main_default/: the main job (experiments/main.py, configs/default.py), timed.
# A part that fails or runs out of time is logged and the next one starts.
set -u
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR [SECONDS] [WORKDIR] [RESULTS]}
budget=${2:-560}
workdir=${3:-runs/bench_38}
results=${4:-experiments/results/benchmark.json}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1
start=$SECONDS

part() {  # part NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  if ((left < 20)); then
    echo "== $name: skipped (${left} s of the budget left)" | tee -a "$log"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s): $*" | tee -a "$log"
  local t0=$SECONDS first_line=$(($(wc -l <"$log") + 1))
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  tail -n "+$first_line" "$log" | grep -v -e Warning -e '^  ' | tail -n 12
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import jax, jaxlib, optax, flax; print("jax", jax.__version__, "optax",
optax.__version__, "flax", flax.__version__, jax.devices())'
} 2>&1 | tee -a "$log"
python3 -c 'import jax, metamd_jax, ml_collections, mlxtend, mnist1d
assert jax.default_backend() == "gpu", jax.devices()' >>"$log" 2>&1 || {
  echo "== setup failed: no GPU backend or a missing package (see $log)"
  tail -n 20 "$log"
  exit 1
}

wall=(--workdir "$workdir" --results "$results")
part wall_clock 220 python3 -m scripts.benchmark_wall_clock "${wall[@]}" \
  --json "$out/wall_clock.json"
part wall_clock_elapsed 150 python3 -m scripts.benchmark_wall_clock "${wall[@]}" \
  --optimizers adam,metamd,metamd_low_rank,metamd_adaptive --elapsed \
  --run-lengths 1,2,4,8,16,32,100 \
  --json "$out/wall_clock_elapsed.json"
part wall_clock_blocks 100 python3 -m scripts.benchmark_wall_clock "${wall[@]}" \
  --optimizers adam,metamd_adaptive --set adaptive_blend_block_size=128 \
  --set adaptive_blend_sketch_rank=0 --json "$out/wall_clock_blocks_128.json"
part wall_clock_whole 100 python3 -m scripts.benchmark_wall_clock "${wall[@]}" \
  --optimizers adam,metamd_adaptive --set adaptive_blend_sketch_rank=0 --elapsed \
  --json "$out/wall_clock_whole.json"
part roots 40 python3 -m scripts.benchmark_roots --sizes 10,256,784 --out-dir "$out"
part meta_step_default 90 python3 -m scripts.benchmark_parallel --devices 1 \
  --config configs/default.py --horizon 0 --meta-batch-size 0 --repeats 5 \
  --json "$out/meta_step_default.json"
part step_transformer 60 python3 -m scripts.benchmark_step --models transformer --steps-only \
  --json "$out/step_transformer.json"
part meta_step_transformer 90 python3 -m scripts.benchmark_parallel --devices 1 \
  --config configs/transformer_lm.py --horizon 0 --meta-batch-size 0 --repeats 5 \
  --json "$out/meta_step_transformer.json"
JAX_PLATFORMS=cpu part meta_step_default_cpu 90 python3 -m scripts.benchmark_parallel \
  --devices 1 --config configs/default.py --horizon 0 --meta-batch-size 0 --repeats 3 \
  --json "$out/meta_step_default_cpu.json"
part main_default 200 python3 -m experiments.main --config configs/default.py \
  --workdir "$out/main_default"
echo "== done in $((SECONDS - start)) s" | tee -a "$log"
