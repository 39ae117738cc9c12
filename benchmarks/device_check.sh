#!/usr/bin/env bash
# The one prepared script for a session lent a GPU (the "exact and fast on convolutional networks" issue, section 3,
# and every CUDA test). Run from the repository root on the lent machine, with a time limit that leaves a rerun:
#
#     bash benchmarks/device_check.sh "$OUT"        # about 11 minutes at most; figures and logs under $OUT
#
# Each part has its own limit, so a slow part cannot take the others' time; every part's log is kept.
#   1. tests/test_cuda.py: every algorithm's meta-gradient on CUDA equals the CPU's in float64, CLI train/eval.
#   2. the sinusoid whole training iteration (Trainer.step) with CUDA graphs: target >= 10,000 it/s on one H100.
#   3. the sinusoid meta-step alone, eager vmap and compiled with CUDA graphs, MAML and MAML Enhanced.
#   4. how far TF32 and bfloat16/float16 autocast move Conv-4's meta-gradient from float64's.
#   5. the MAML paper's 20-way Omniglot protocol (Conv-4, 64 filters, 5 steps, meta-batch 16), compiled with CUDA
#      graphs, for as long as its limit allows: iterations per second and the projected time of 60,000
#      iterations (target <= 15 minutes). Reads ../shared/data/omniglot, or the folder in $OMNIGLOT.
set -u
OUT=${1:-${OUT:-results/device}}
mkdir -p "$OUT"
# The lent machine is offline and brings its own CUDA build of torch: use the package from this tree, uninstalled.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$OUT/torch.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

part() {  # part NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - t0)) s"
    tail -n 14 "$OUT/$name.log"
}

part cuda_tests 150 python -m pytest -q tests/test_cuda.py tests/test_compile_modes.py
part iteration 150 python benchmarks/iteration.py --no-peer --device cuda --compile-mode reduce-overhead \
    --steps 1 5 --seconds 3 --json "$OUT/iteration_cuda.json"
part throughput 150 python benchmarks/throughput.py --device cuda --algorithms maml maml_enhanced --steps 1 5 \
    --paths vmap compiled --threads all --compile-mode reduce-overhead --seconds 2 --json "$OUT/throughput_cuda.json"
part precision 60 python benchmarks/precision.py --device cuda --json "$OUT/precision_cuda.json"
part lake20 150 python -m metagrad train --config configs/omniglot/maml_20way.toml --device cuda --out "$OUT/lake20" \
    --no-progress "task.data=${OMNIGLOT:-../shared/data/omniglot}" train.compile=true train.compile_mode=reduce-overhead train.log_every=50 train.val_every=100000 \
    train.checkpoint_every=100000
python - "$OUT/lake20/metrics.jsonl" <<'PY'
import json, sys
try:
    rows = [json.loads(line) for line in open(sys.argv[1]) if '"seconds"' in line]
except OSError:
    sys.exit("lake20: no metrics")
if len(rows) >= 2:
    (a, b) = rows[0], rows[-1]
    rate = (b["iteration"] - a["iteration"]) / (b["seconds"] - a["seconds"])
    print(f"lake20: {rate:.1f} it/s after compilation, 60,000 iterations in {60000 / rate / 60:.1f} min "
          f"(first logged iteration at {a['seconds']:.0f} s)")
PY
