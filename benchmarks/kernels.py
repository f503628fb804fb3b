"""The fused CUDA kernels against copy bandwidth and against their torch references.

For each kernel and size: median time (CUDA events, after warm-up, inputs larger than L2),
effective bandwidth = ideal bytes / time, its fraction of the measured device-to-device copy
bandwidth, and the speedup over the same math written with torch ops. Ideal bytes per fp32
element: fused sign + EF 20.1 (two passes: the per-block scale must be known before the
signs) and 12.1 for one pass; unpack-average of n messages 4 + n/8; top-k + EF one-pass
floor 12 (read p and e, write e). The one-pass sign kernel (blocks of at most 4096 elements,
one per CTA) moves 12.25 (12.1 plus zeroing the packed words). Every ratio is taken against
the device-to-device copy bandwidth measured in the same run; each row names its goal (G1:
sign + EF at >= 80% of copy and >= 4x the torch ops; G2: unpack-average at >= 75% of copy;
G3: exact top-k + EF <= 2x its one-pass floor and >= 4x the torch recipe; G3a: the
threshold variant <= 1.3x the floor) and whether this run met it.

    python benchmarks/kernels.py
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table, write_json  # noqa: E402
from ddp_hooks._ext import cuda as kernels  # noqa: E402
from ddp_hooks.compress.bits import pack_signs  # noqa: E402
from ddp_hooks.compress.scaled_sign import block_scales, decode  # noqa: E402
from ddp_hooks.kernels import status  # noqa: E402


def _time(fn, repeats: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def run(sizes, repeats, topk_n, fractions) -> list[dict]:
    rows = []
    for n in sizes:
        src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
        copy_bw = 8 * n / _time(lambda: dst.copy_(src), repeats)
        p, e, e_out = torch.randn(n, device="cuda"), torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
        block = 4096
        bounds = list(range(0, n, block)) + [n]
        blocks = list(zip(bounds, bounds[1:]))
        offsets = torch.tensor(bounds, device="cuda")
        fused = _time(lambda: kernels.sign_compress_ef(p, e, 1.0, offsets, e_out), repeats)
        one_pass = _time(lambda: kernels.sign_compress_ef(p, e, 1.0, offsets, e_out, max_block=block), repeats)

        def reference():
            v = p + e
            scales = block_scales(v, blocks)
            packed = pack_signs(v)
            return v - decode(packed, scales, blocks, torch.empty_like(v))

        ref = _time(reference, 3, warmup=1)
        rows.append(_row("sign+EF (fused, 2 passes)", n, fused, ref, 20.1, copy_bw, floor_bytes=12.1, goal="G1"))
        rows.append(_row("sign+EF (fused, 1 pass, 4096-blocks)", n, one_pass, ref, 12.25, copy_bw, 12.1, "G1"))
        for m in (8, 64):
            packed_rows = torch.randint(0, 256, (m, (n + 7) // 8), dtype=torch.uint8, device="cuda")
            scales = torch.rand(m, len(blocks), device="cuda")
            out = torch.empty(n, device="cuda")
            t = _time(lambda: kernels.unpack_average(packed_rows, scales, offsets, out), repeats)
            ref_t = _time(
                lambda: (
                    sum(decode(packed_rows[r], scales[r], blocks, torch.empty(n, device="cuda")) for r in range(m)) / m
                ),
                3,
                warmup=1,
            )
            rows.append(_row(f"unpack-average n={m}", n, t, ref_t, 4 + m / 8, copy_bw, goal="G2"))
    for frac in fractions:
        n, k = topk_n, max(1, int(topk_n * frac))
        p, e = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
        e0 = e.clone()
        src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
        copy_bw = 8 * n / _time(lambda: dst.copy_(src), repeats)
        exact = _time(lambda: (e.copy_(e0), kernels.topk_ef(p, e, k)), repeats)
        reset = _time(lambda: e.copy_(e0), repeats)
        threshold = torch.tensor(
            float(torch.quantile(torch.randn(1_000_000, device="cuda").abs(), 1 - frac)), device="cuda"
        )
        approx = _time(lambda: (e.copy_(e0), kernels.threshold_ef(p, e, threshold, int(1.05 * k))), repeats)

        def recipe():  # add, abs, topk, error-feedback scatter
            acc = p + e
            _, idx = acc.abs().topk(k, sorted=False)
            values = acc[idx]
            acc[idx] = 0
            return idx, values

        ref = _time(lambda: (e.copy_(e0), recipe()), 5, warmup=2)
        rows.append(_row(f"top-k {frac:.1%} exact", n, exact - reset, ref - reset, 12.0, copy_bw, 12.0, "G3"))
        rows.append(_row(f"top-k {frac:.1%} threshold", n, approx - reset, ref - reset, 12.0, copy_bw, 12.0, "G3a"))
    return rows


# the goals, as ratios to what this run measured: (min fraction of copy bandwidth, max time
# over the one-pass floor at copy bandwidth, min speed-up over the torch recipe)
GOALS = {"G1": (0.8, None, 4.0), "G2": (0.75, None, None), "G3": (None, 2.0, 4.0), "G3a": (None, 1.3, None)}


def _row(kernel, n, seconds, ref_seconds, ideal, copy_bw, floor_bytes=None, goal=None):  # noqa: PLR0913
    eff = ideal * n / seconds
    floor = (seconds / (floor_bytes * n / copy_bw)) if floor_bytes else None
    row = {
        "kernel": kernel,
        "n": n,
        "us": 1e6 * seconds,
        "ideal_B_per_elem": ideal,
        "effective_GBps": eff / 1e9,
        "of_copy": eff / copy_bw,
        "copy_GBps": copy_bw / 1e9,
        "speedup_vs_torch": ref_seconds / seconds,
        "vs_one_pass_floor": floor,
        "goal": goal,
    }
    if goal is not None:
        min_copy, max_floor, min_speedup = GOALS[goal]
        row["goal_met"] = (
            (min_copy is None or row["of_copy"] >= min_copy)
            and (max_floor is None or (floor is not None and floor <= max_floor))
            and (min_speedup is None or row["speedup_vs_torch"] >= min_speedup)
        )
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=f"{2**24},{10**8}")
    parser.add_argument("--topk-n", type=int, default=100_000_000)
    parser.add_argument("--fractions", default="0.001,0.01")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or kernels.EXTENSION.get() is None:
        print(f"benchmarks/kernels.py needs a CUDA GPU and the built extension ({status()}); nothing measured")
        return []
    rows = run(
        [int(s) for s in args.sizes.split(",")],
        args.repeats,
        args.topk_n,
        [float(f) for f in args.fractions.split(",")],
    )
    print(
        table(
            rows,
            [
                ("kernel", "kernel", ""),
                ("n", "n", ",d"),
                ("us", "us", ".1f"),
                ("effective_GBps", "GB/s", ".0f"),
                ("of_copy", "of copy", ".0%"),
                ("speedup_vs_torch", "vs torch", ".1f"),
                ("vs_one_pass_floor", "vs 1-pass floor", ".2f"),
                ("goal", "goal", ""),
                ("goal_met", "met", ""),
            ],
        )
    )
    path = write_json("kernels_cuda", {"rows": rows}, args.out)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
