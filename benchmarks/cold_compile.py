"""Cold compile of the sinusoid training step, what Inductor's instruction-set probes cost in it, and what building
the C++ wrapper apart from the kernels saves.

Run from the repository root (one core)::

    taskset -c 0 python benchmarks/cold_compile.py --steps 1 5 [--rounds 2] [--variants default build-separate]
        [--no-probes] [--json docs/data/cold_compile_cpu.json]

Every measurement runs in a fresh Python process with an empty Inductor cache folder (``TORCHINDUCTOR_CACHE_DIR``),
as a first run on a new machine does:

- ``probes``: ``torch._inductor.cpu_vec_isa.valid_vec_isa_list()`` alone, with the empty cache (it compiles and
  loads a probe library for each instruction set), then again in a second process on the now-filled cache;
- ``default``: the first ``Trainer.step()`` on ``configs/sinusoid/maml.toml`` compiled by ``learner.compile()``,
  which on the CPU sets ``cpp.vec_isa_ok`` (no probes for the base instruction sets);
- ``probing``: the same with the same options except ``cpp.vec_isa_ok`` (Inductor's own probing);
- ``build-separate``: the same options with Inductor's ``cpp_wrapper_build_separate`` (the C++ wrapper built at -O1
  apart from the kernels at -O3);
- ``no-memory-planning``: the same options without Inductor's ``memory_planning`` (one allocation per intermediate
  tensor).

``--warm`` also times each variant's first step again in a fresh process on the cache folder the cold run filled,
as a second ``metagrad train`` on the same machine meets it (Inductor's and AOTAutograd's caches).

Inductor keeps its precompiled C++ headers in its default folder (``/tmp/torchinductor_$USER/precompiled_headers``),
which ``TORCHINDUCTOR_CACHE_DIR`` does not move: they are built once per machine and set of compiler flags and
reused by every run here, so the first round of a variant may include their build (about 140 MB each).

Variants take turns in each round; the medians over the rounds are printed. The step time after the compile
(the mean of 300 steps) shows that both variants pick the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import torch
what, steps = sys.argv[1], int(sys.argv[2])
if what == "probes":
    import torch._inductor.cpu_vec_isa as isa
    t0 = time.perf_counter()
    found = isa.valid_vec_isa_list()
    print(json.dumps({"seconds": time.perf_counter() - t0, "isas": [str(i) for i in found]}))
    sys.exit(0)
from metagrad import Trainer
from metagrad.presets import preset
torch.set_num_threads(1)
cfg = preset("maml")
cfg.algorithm.inner_steps = steps
cfg.train.compile, cfg.train.threads, cfg.train.iterations = False, 1, 10**9
cfg.train.val_every = cfg.train.checkpoint_every = 10**9
trainer = Trainer(cfg, sys.argv[3])
trainer.learner.compile()
own = dict(trainer.learner._torch_compile_options["options"])  # what compile() chose on this CPU
if what == "probing":
    del own["cpp.vec_isa_ok"]
elif what == "build-separate":
    own["cpp_wrapper_build_separate"] = True
elif what == "no-memory-planning":
    own["memory_planning"] = False
if what != "default":
    trainer.learner.compile(options=own)
t0 = time.perf_counter()
trainer.step()
first = time.perf_counter() - t0
for _ in range(50):
    trainer.step()
t0 = time.perf_counter()
for _ in range(300):
    trainer.step()
print(json.dumps({"seconds": first, "step_us": (time.perf_counter() - t0) / 300 * 1e6}))
"""


def child(what: str, steps: int, cache: str, run_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    env.pop("TORCHINDUCTOR_VEC_ISA_OK", None)
    out = subprocess.run([sys.executable, "-c", CHILD, what, str(steps), run_dir], env=env, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 5], help="inner steps")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="+", choices=("default", "probing", "build-separate", "no-memory-planning"),
                    default=["default", "probing", "build-separate"])  # fmt: skip
    ap.add_argument("--no-probes", action="store_true", help="skip timing the instruction-set probes alone")
    ap.add_argument("--warm", action="store_true",
                    help="also time each first step again, in a fresh process on the cache it filled")  # fmt: skip
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    results: dict = {"probes": {"cold": [], "warm": []}, "compile": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(0 if args.no_probes else args.rounds):
            cache = os.path.join(d, f"probe-cache-{r}")
            cold, warm = (child("probes", 0, cache, d) for _ in range(2))
            results["probes"]["cold"].append(cold["seconds"])
            results["probes"]["warm"].append(warm["seconds"])
            results["probes"]["isas"] = cold["isas"]
        probes = results["probes"]
        if probes["cold"]:
            print(f"instruction-set probes: {statistics.median(probes['cold']):.2f} s on an empty cache, "
                  f"{statistics.median(probes['warm']):.2f} s on a filled one; found {probes['isas']}")  # fmt: skip
        for steps in args.steps:
            rows: dict[str, list[dict]] = {v: [] for v in args.variants}
            for r in range(args.rounds):
                for variant, got in rows.items():
                    cache = os.path.join(d, f"cache-{steps}-{variant}-{r}")
                    got.append(child(variant, steps, cache, os.path.join(d, f"run-{steps}-{variant}-{r}")))
                    if args.warm:  # a second run on this machine: the same cache, filled by the first
                        again = child(variant, steps, cache, os.path.join(d, f"run-{steps}-{variant}-{r}-warm"))
                        got[-1]["warm_seconds"] = again["seconds"]
            for variant, got in rows.items():
                first = statistics.median(g["seconds"] for g in got)
                step = statistics.median(g["step_us"] for g in got)
                each = ", ".join(f"{g['seconds']:.1f}" for g in got)
                print(f"  {steps} inner step(s), {variant:<8} cold compile (first step) {first:5.1f} s ({each}); "
                      f"then {step:.0f} µs a step")  # fmt: skip
                if args.warm:
                    warm = [g["warm_seconds"] for g in got]
                    print(f"    on the filled cache (a second run): {statistics.median(warm):5.1f} s "
                          f"({', '.join(f'{w:.1f}' for w in warm)})")  # fmt: skip
                results["compile"].append({"steps": steps, "variant": variant,
                                           "first_step_s": [g["seconds"] for g in got],
                                           "step_us": [g["step_us"] for g in got],
                                           "warm_first_step_s": [g.get("warm_seconds") for g in got]})  # fmt: skip
    if args.json:
        import torch

        with open(args.json, "w") as f:
            json.dump({"info": {"torch": torch.__version__, "rounds": args.rounds}, **results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
