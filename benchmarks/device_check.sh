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
# Each part has its own limit (540 s in all by default), most important first; every log and JSON goes into one
# archive, $OUT/device_check.tgz (the device tool returns at most 8 files), also when a part runs out of time.
# PARTS="cuda_tests iteration ..." runs only those parts (a second, shorter call); CONV4_PATHS the Conv-4 rows.
#   cuda_tests: tests/test_cuda.py (every algorithm's meta-gradient on CUDA equals the CPU's in float64; the
#      training update replayed from real CUDA graphs trains as the separate parts, sinusoid and Conv-4),
#      tests/test_cuda_graph.py, and the CUDA cases of tests/test_numerics.py (TF32 off within the learner's calls).
#   iteration, iteration_compiled, iteration_separate: the sinusoid whole training iteration (Trainer.step; target
#      >= 10,000 it/s on one H100): the eager update in metagrad's CUDA graphs (train.cuda_graphs, the default on a
#      GPU) at 1 and 5 steps, then Inductor's update in them (train.compile), each with a profile of 50 steps
#      (kernel launches, graph replays, host synchronisations); the eager separate parts and Inductor's own CUDA
#      graphs (reduce-overhead) as baselines on the same card.
#   conv4_20way: the 20-way Omniglot protocol's meta-iteration (Conv-4-64, 5 steps, meta-batch 16, 5 queries a
#      class) on random images, the update in CUDA graphs: cuDNN's grouped convolutions against the default, every
#      convolution a batched matrix product over patches gathered in blocks (with their written-out backward pass
#      and with autograd's), the MAML code's strided network (graphs+stride: about 3.5x less arithmetic), and the
#      default update run eagerly (vmap: its profile names the operator behind each kernel), with each row's
#      kernels by GPU time over 2 iterations (what bounds the step: matrix products or element-wise work). Other
#      rows, in CONV4_PATHS: graphs+shifts, graphs-loop, graphs-compiled, graphs+tf32, graphs+bf16
#      (benchmarks/conv4.py).
#   conv4_compiled (not by default): the same protocol's update compiled by Inductor inside the CUDA graph
#      (graphs-compiled; its first_s is the compilation) beside the eager update in the graph, on both networks
#      (+stride: on the CPU compiling made the strided network 1.64-1.76x faster at this protocol).
#   conv_patches: one Conv-4 convolution (1,920 images: the 20-way protocol's 16 tasks) differentiated to second
#      order, each way Conv3x3 computes it (cuDNN, the product over blocks, their gather left to autograd, or
#      over shifts), outside vmap.
#   lake20: the MAML paper's 20-way Omniglot protocol on its code's own strided network
#      (LAKE_CONFIG=configs/omniglot/maml_20way_strided.toml; maml_20way.toml is the pooling network of earlier
#      sessions' runs) trained with the default settings, eager (train.compile=false: the config compiles for the
#      CPU), for LAKE_S=125 s (interrupted; the latest checkpoint,
#      every 500 iterations, is kept): the rate, the projected time of 60,000 iterations (target <= 15 minutes),
#      and the latest checkpoint's error on Lake's 20 runs.
# The third GPU session's calls (docs/results.md, with the parts of then) took 274 s and 364 s.
set -u
OUT=${1:-${OUT:-results/device}}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
mkdir -p "$OUT"
trap 'tar czf "$OUT/device_check.tgz" -C "$WORK" --exclude="*.pt" . 2>/dev/null' EXIT
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
    tar czf "$OUT/device_check.tgz" -C "$WORK" --exclude='*.pt' . 2>/dev/null  # also after each part: a hard kill skips the trap
}

# PARTS="cuda_tests iteration ..." runs only those (a second, shorter call); by default all but the sinusoid's
# compiled and separate rows (iteration_compiled, iteration_separate: measured on an H100 in earlier sessions).
PARTS=${PARTS:-cuda_tests iteration conv4_20way conv_patches lake20}
want() {
    [[ " $PARTS " == *" $1 "* ]]
}

# Verbose, with a traceback of any test still running after 60 s. The TF32 test first: it ran last before, after
# a capture that had failed, and failed. In one process (addopts without pyproject's xdist workers: the lent
# machine's own torch install may not have pytest-xdist, and the tests share one GPU).
want cuda_tests && part cuda_tests 150 "$PY" -m pytest -v -o addopts=-ra -o faulthandler_timeout=60 -p no:cacheprovider \
    tests/test_numerics.py tests/test_cuda.py tests/test_cuda_graph.py -k "cuda or tf32 or graph or replay"
# One row kind per call: each row profiles into the same file name.
want iteration && part iteration 40 "$PY" benchmarks/iteration.py --no-peer --device cuda --compile off --steps 1 5 \
    --seconds 2 --json "$WORK/iteration_cuda_graphs.json" --profile 50 --profile-out "$WORK/iteration_profile_{steps}.txt"
want iteration_compiled && part iteration_compiled 90 "$PY" benchmarks/iteration.py --no-peer --device cuda \
    --compile on --steps 1 --seconds 2 --json "$WORK/iteration_cuda_compiled_graphs.json" --profile 50 \
    --profile-out "$WORK/iteration_profile_compiled_{steps}.txt"
want iteration_separate && part iteration_separate 90 bash -c "\"$PY\" benchmarks/iteration.py --no-peer \
    --device cuda --compile off --update separate --steps 1 5 --seconds 2 \
    --json $WORK/iteration_cuda_separate.json \
  && \"$PY\" benchmarks/iteration.py --no-peer --device cuda --compile-mode reduce-overhead --steps 1 --seconds 2 \
    --json $WORK/iteration_cuda_reduce_overhead.json"
want conv4_20way && part conv4_20way 150 "$PY" benchmarks/conv4.py --device cuda --ways 20 --steps 5 --meta-batch 16 \
    --queries 5 --threads 4 --iters 5 --warmup 2 \
    --paths ${CONV4_PATHS:-graphs+convolutions graphs graphs+autograd graphs+stride vmap} \
    --json "$WORK/conv4_20way_cuda.json" --profile 2 --profile-out "$WORK/conv4_profile_{path}.txt"
LAKE_S=${LAKE_S:-125}
LAKE_CONFIG=${LAKE_CONFIG:-configs/omniglot/maml_20way_strided.toml}
want conv4_compiled && part conv4_compiled 300 "$PY" benchmarks/conv4.py --device cuda --ways 20 --steps 5 \
    --meta-batch 16 --queries 5 --threads 4 --iters 5 --warmup 2 --paths graphs+stride graphs-compiled+stride \
    graphs graphs-compiled \
    --json "$WORK/conv4_20way_cuda_compiled.json"
want conv_patches && part conv_patches 30 "$PY" benchmarks/conv_patches.py --device cuda --images 1920 \
    --sizes 28 14 7 --seconds 0.5
want lake20 && part lake20 $((LAKE_S + 5)) timeout -s INT "$LAKE_S" "$PY" -m metagrad train --config "$LAKE_CONFIG" \
    --device cuda --no-progress --out "$WORK/lake20" task.data="$OMNIGLOT" train.compile=false train.log_every=100 \
    train.val_every=100000 train.checkpoint_every=500 train.keep_last=2
want lake20 && "$PY" - "$WORK/lake20/metrics.jsonl" <<'PY' | tee "$WORK/lake20_rate.txt"
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
    print(f"lake20: {rate:.1f} it/s after the first log (iterations {a['iteration']}-{b['iteration']}, "
          f"first logged at {a['seconds']:.0f} s); 60,000 iterations in {60000 / rate / 60:.1f} min")
PY
want lake20 && part lake20_eval 40 "$PY" -m metagrad eval "$WORK/lake20" --benchmark omniglot-runs --steps 5 --device cuda \
    --data "$OMNIGLOT" --json "$WORK/lake_runs_maml20_h100.json"
tar czf "$OUT/device_check.tgz" -C "$WORK" --exclude='*.pt' . 2>/dev/null
trap - EXIT
