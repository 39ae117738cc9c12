"""Which way round a small batched matrix product is faster on this CPU: ``A @ B`` or ``(Bᵀ @ Aᵀ)ᵀ``.

Run from the repository root (one core)::

    taskset -c 0 python benchmarks/bmm_orientation.py [--dtype float64] [--json docs/data/bmm_orientation_cpu.json]

For ``[B, M, K] @ [B, K, N]`` over a grid of M, K, N (B = 25 tasks) and each of the four input layouts (an operand
contiguous, or a transposed view, as autograd hands them over), it times ``torch.bmm`` into a ``[B, M, N]``
buffer against ``torch.bmm`` of the transposed operands into a ``[B, N, M]`` buffer: the best of 5 rounds of
``--calls`` calls each. It prints each pair and their ratio, then whether the rule of
:class:`metagrad.matmul_orientation.BatchedMatmulOrientation` (turn around where ``N < 16 <= M``) picks the
faster way: how many shapes it turns around, the worst and median ratio among them, and the shapes it leaves where
turning around would have gained more than 30 %.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable

import torch

from metagrad.matmul_orientation import turns_around


def best_time(fn: Callable[[], object], calls: int) -> float:
    for _ in range(max(calls // 8, 5)):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--tasks", type=int, default=25)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 40, 100], help="values of M, K and N")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--json", help="write every row here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dtype, b = getattr(torch, args.dtype), args.tasks
    rows = []
    print(f"bmm [{b}, M, K] @ [{b}, K, N], {args.dtype}, one thread: µs direct, µs turned around, ratio")
    for m, k, n in itertools.product(args.sizes, repeat=3):
        for a_t, b_t in itertools.product((False, True), repeat=2):
            x = torch.randn(b, k, m, dtype=dtype).transpose(1, 2) if a_t else torch.randn(b, m, k, dtype=dtype)
            y = torch.randn(b, n, k, dtype=dtype).transpose(1, 2) if b_t else torch.randn(b, k, n, dtype=dtype)
            out, out_t = torch.empty(b, m, n, dtype=dtype), torch.empty(b, n, m, dtype=dtype)
            direct = best_time(lambda x=x, y=y, out=out: torch.bmm(x, y, out=out), args.calls)
            turned = best_time(
                lambda x=x, y=y, out_t=out_t: torch.bmm(y.transpose(1, 2), x.transpose(1, 2), out=out_t), args.calls
            )
            row = {"M": m, "K": k, "N": n, "A_transposed": a_t, "B_transposed": b_t, "direct_us": direct,
                   "turned_us": turned, "ratio": direct / turned, "rule_turns": turns_around(x, y)}  # fmt: skip
            rows.append(row)
            mark = "  turned by the rule" if row["rule_turns"] else ""
            print(f"  M {m:4} K {k:4} N {n:4}  A{'ᵀ' if a_t else ' '} B{'ᵀ' if b_t else ' '}  {direct:8.1f} "
                  f"{turned:8.1f}  {row['ratio']:5.2f}{mark}")  # fmt: skip
    turned_rows = [r["ratio"] for r in rows if r["rule_turns"]]
    missed = [r for r in rows if not r["rule_turns"] and r["ratio"] > 1.3]
    if turned_rows:
        print(f"the rule turns {len(turned_rows)} of {len(rows)} around: ratio worst {min(turned_rows):.2f}, "
              f"median {statistics.median(turned_rows):.2f}, best {max(turned_rows):.2f}")  # fmt: skip
    print(f"left alone although turning would gain > 30 %: {len(missed)}")
    for r in missed:
        print(f"  M {r['M']} K {r['K']} N {r['N']}: {r['ratio']:.2f}")
    if args.json:
        info = {"torch": torch.__version__, "dtype": args.dtype, "tasks": b, "threads": 1}
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
