#!/usr/bin/env bash
# The one prepared script for a session lent a GPU (the "exact and fast on convolutional networks" issue, section 3,
# and every CUDA test). The lent machine is offline, brings its own CUDA build of torch (python3) and gets only
# the working tree, so the Omniglot data must travel in an ignored folder named in `carry`. Here, once:
#
#     echo /.omniglot/ >> .git/info/exclude && cp -r ../shared/data/omniglot .omniglot
#
# then the device tool's run with carry [".omniglot"] and a timeout_s of 590 (the most one command may run is 600 s;
# one run and a machine start fit the session's 15 minutes: a start took about 30 s last time):
#
#     OMNIGLOT=.omniglot bash benchmarks/device_check.sh "$OUT"
#
# Each part has its own limit (550 s in all), most important first; every log and JSON goes into one archive,
# $OUT/device_check.tgz (the device tool returns at most 8 files), also when a part runs out of time.
#   1. tests/test_cuda.py, tests/test_compile_modes.py, tests/test_numerics.py: CUDA equals the CPU in float64,
#      CUDA graphs' outputs, TF32 off within the learner's calls.
#   2. the sinusoid whole training iteration (Trainer.step) with CUDA graphs (target >= 10,000 it/s, one H100),
#      and the meta-step alone, with Inductor's hints on why it would skip the graphs and a profile of 50 steps
#      (kernel launches, graph replays and host synchronisations per step).
#   3. the MAML paper's 20-way Omniglot protocol (Conv-4, 64 filters, 5 steps, meta-batch 16) compiled with CUDA
#      graphs for as long as its limit allows (eagerly, if compiling fails): iterations per second, the projected
#      time of 60,000 iterations (target <= 15 minutes), and the last checkpoint's error on Lake's 20 runs.
#      The last session found no iteration logged within 200 s compiled, and 4.5 it/s eagerly; compiling
#      this step took 328 s on one CPU core (benchmarks/conv4.py --paths vmap-compiled, docs/results.md; 206 s
#      with the C++ wrapper metagrad now gives Inductor on the CPU), of which the GPU's Triton kernels replace
#      the C++ compilation (184 s), hence 270 s here.
set -u
OUT=${1:-${OUT:-results/device}}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
mkdir -p "$OUT"
trap 'tar czf "$OUT/device_check.tgz" -C "$WORK" . 2>/dev/null' EXIT
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OMNIGLOT=${OMNIGLOT:-../shared/data/omniglot}
[ -d "$OMNIGLOT" ] || echo "warning: no Omniglot data at $OMNIGLOT: part lake20 will fail"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$WORK/torch.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$WORK/gpu.txt"

part() {  # part NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - t0)) s" | tee -a "$WORK/$name.log"
    tail -n 12 "$WORK/$name.log"
    tar czf "$OUT/device_check.tgz" -C "$WORK" . 2>/dev/null  # also after each part: a hard kill skips the trap
}

# Verbose, with a traceback of any test still running after 60 s: the last session's quiet run timed out unnamed.
part cuda_tests 120 "$PY" -m pytest -v -o faulthandler_timeout=60 tests/test_cuda.py tests/test_compile_modes.py \
    tests/test_numerics.py
# perf_hints: what makes Inductor skip CUDA graphs (last session: 817 it/s with them, 2,678 for the meta-step
# alone).
part iteration 70 env TORCH_LOGS=perf_hints "$PY" benchmarks/iteration.py --no-peer --device cuda \
    --compile-mode reduce-overhead --steps 1 --seconds 3 --json "$WORK/iteration_cuda.json" --profile 50 \
    --profile-out "$WORK/iteration_profile_{steps}.txt"
part throughput 45 env TORCH_LOGS=perf_hints "$PY" benchmarks/throughput.py --device cuda --algorithms maml \
    --steps 1 --paths compiled --threads all --compile-mode reduce-overhead --seconds 2 \
    --json "$WORK/throughput_cuda.json"
LAKE="$PY -m metagrad train --config configs/omniglot/maml_20way.toml --device cuda --no-progress --out $WORK/lake20
    task.data=$OMNIGLOT train.log_every=25 train.val_every=100000 train.checkpoint_every=250 train.keep_last=100"
t0=$SECONDS
part lake20 270 $LAKE train.compile=true train.compile_mode=reduce-overhead
code=$(tail -n 1 "$WORK/lake20.log" | awk '{print $2}')
left=$((270 - (SECONDS - t0)))
if [ "$code" != 0 ] && [ "$code" != 124 ] && [ "$left" -gt 30 ]; then  # compiling failed: the eager path instead
    rm -rf "$WORK/lake20"
    part lake20_eager "$left" $LAKE
fi
"$PY" - "$WORK/lake20/metrics.jsonl" <<'PY' | tee "$WORK/lake20_rate.txt"
import json, sys
try:
    rows = [json.loads(line) for line in open(sys.argv[1]) if '"seconds"' in line]
except OSError:
    rows = []
if len(rows) < 2:
    print(f"lake20: {len(rows)} logged row(s), no rate")
else:
    a, b = rows[0], rows[-1]
    rate = (b["iteration"] - a["iteration"]) / (b["seconds"] - a["seconds"])
    print(f"lake20: {rate:.1f} it/s after compilation (iterations {a['iteration']}-{b['iteration']}, "
          f"first logged at {a['seconds']:.0f} s); 60,000 iterations in {60000 / rate / 60:.1f} min")
PY
part lake20_eval 45 "$PY" -m metagrad eval "$WORK/lake20" --benchmark omniglot-runs --steps 5 --device cuda \
    --json "$WORK/lake_runs_maml20_h100.json"
