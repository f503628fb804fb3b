"""dist-EF-SGDM's scaled-sign codec on CPU: the fused C loops (ddp_hooks._ext.cpu) against the
torch operations, side by side, per step of the codec and for a whole worker + server round.

For each model's gradient (one bucket holding every tensor, one block per tensor) and thread
count: median time of each step with the fused loops and with the torch reference, the
speedup, and the effective bandwidth (ideal bytes / time) as a fraction of the measured copy
bandwidth at the same thread count. Ideal bytes per fp32 element: worker input 20 (read g, m,
e; write m, p), compress 8.125 (read p; write the residual and the packed signs), decode
4.125, decode-and-add 8.125. "round" is everything one worker of an n-worker sharded exchange
computes per step (input and compress of its bucket, its requests to the n owners, the average
of the n workers' rows for the pieces it serves, the server step on them, the n replies put
back in bucket order and decoded), without communication. LAQ (4 bits):
"laq-quantize" is a worker's quantizer as the uploads mode runs it (radius, codes and both
norms: read g and q_ref twice, write the codes, 17 B), "laq-receive" adds one received upload
to the sum (8.5 B).

    python benchmarks/cpu_codec.py                       # resnet50, gpt; 1 thread and all cores
    python benchmarks/cpu_codec.py --models resnet18 --threads 1
"""

import argparse
import os
import statistics
import sys
import time
from math import prod
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import comma_choices, listing, table, write_json  # noqa: E402
from benchmarks.shapes import MODELS  # noqa: E402
from ddp_hooks._ext import cpu as native  # noqa: E402
from ddp_hooks.algorithms.ef_shards import ShardPlan, assign_owners  # noqa: E402
from ddp_hooks.compress import scaled_sign as sign  # noqa: E402
from ddp_hooks.compress.bits import pack_codes  # noqa: E402
from ddp_hooks.compress.laq import add_dequantized, quantize_step  # noqa: E402
from ddp_hooks.compress.sign_worker import Momentum, WorkerBuffers, ef_input, worker_message  # noqa: E402

IDEAL_BYTES = {
    "input": 20.0,
    "compress": 8.125,
    "decode": 4.125,
    "decode+add": 8.125,
    "laq-quantize": 17.0,
    "laq-receive": 8.5,
}
STEPS = ["input", "compress", "decode", "decode+add", "round", "laq-quantize", "laq-receive"]


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _steps(numels: list[int], workers: int) -> dict:
    """The codec's steps as closures over fresh buffers of one bucket."""
    n = sum(numels)
    blocks = sign.ranges(numels)
    owners = assign_owners(numels, None, workers)
    plan = ShardPlan.build(numels, owners, None, workers, torch.device("cpu"))
    g, m, e = torch.randn(n), torch.randn(n), torch.randn(n)
    buffers = WorkerBuffers(torch.empty(n), torch.empty(n), torch.empty(n))
    out, residual = torch.empty(n), torch.empty(n)
    packed, scales = sign.compress(g, blocks, residual)
    how = Momentum(0.9, True)
    requests = plan.requests(packed, scales, torch.tensor(False))
    row, msg = plan.rows[0], plan.message
    rows = requests[:1].expand(plan.n, -1).contiguous()  # the n workers' rows for this rank's pieces
    mean, server, error = torch.empty(row.count), torch.empty(row.count), torch.zeros(row.count)
    replies = requests  # every owner's reply has its request's layout
    whole = torch.empty_like(packed)

    def one_round():
        worker_message(g, (m, e), how, 1.0, plan.blocks, buffers)
        plan.requests(packed, scales, torch.tensor(False))
        sign.average(msg.signs(rows)[:, : row.count // 8], plan.row_scales(0, msg.scales(rows)), row.pieces, mean)
        sign.compress_ef(mean, error, 1.0, row.pieces, server)
        plan.gather_replies(replies, whole)  # the n servers' replies, back in bucket order
        sign.decode(whole, plan.reply_piece_scales(replies), list(plan.pieces.blocks), out)

    codes = torch.empty(n, dtype=torch.uint8)
    quantize_step(g, m, 4, codes=codes)
    packed_codes, radius = pack_codes(codes, 4), torch.tensor(0.5)

    return {
        "laq-quantize": lambda: quantize_step(g, m, 4, codes=codes),
        "laq-receive": lambda: add_dequantized(out, packed_codes, radius, 4),
        "input": lambda: ef_input(g, m, how, (e, 1.0), buffers),
        "compress": lambda: sign.compress(g, blocks, residual),
        "decode": lambda: sign.decode(packed, scales, blocks, out),
        "decode+add": lambda: sign.decode(packed, scales, blocks, out, accumulate=True),
        "round": one_round,
        "_numel": n,
    }


def run(models: list[str], threads: list[int], repeats: int, workers: int) -> list[dict]:
    rows = []
    before = torch.get_num_threads()
    try:
        for model in models:
            numels = [prod(s) for s in MODELS[model]()]
            steps = _steps(numels, workers)
            n = steps["_numel"]
            for t in threads:
                torch.set_num_threads(t)
                src, dst = torch.randn(n), torch.empty(n)
                copy_bw = 8 * n / _time(lambda: dst.copy_(src), repeats)
                for name in STEPS:
                    fused = _time(steps[name], repeats)
                    with native.disabled():
                        ref = _time(steps[name], repeats)
                    ideal = IDEAL_BYTES.get(name)
                    rows.append(
                        {
                            "model": model,
                            "numel": n,
                            "threads": t,
                            "step": name,
                            "fused_ms": fused * 1e3,
                            "torch_ms": ref * 1e3,
                            "speedup": ref / fused,
                            "fused_gbs": ideal * n / fused / 1e9 if ideal else None,
                            "of_copy": ideal * n / fused / copy_bw if ideal else None,
                            "copy_gbs": copy_bw / 1e9,
                        }
                    )
    finally:
        torch.set_num_threads(before)
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,gpt", help=listing(MODELS))
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all cores)")
    ap.add_argument("--workers", type=int, default=4, help="world size of the simulated round")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    models = comma_choices(ap, "--models", args.models, MODELS)
    if not native.available():
        raise SystemExit(f"the fused CPU codec is not available ({native.status()}); nothing to compare")
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    rows = run(models, threads, args.repeats, args.workers)
    print(
        table(
            rows,
            [
                ("model", "model", ""),
                ("threads", "thr", "d"),
                ("step", "step", ""),
                ("fused_ms", "fused ms", ".2f"),
                ("torch_ms", "torch ms", ".2f"),
                ("speedup", "speedup", ".1f"),
                ("fused_gbs", "GB/s", ".1f"),
                ("of_copy", "of copy", ".0%"),
            ],
        )
    )
    print(write_json("cpu_codec", {"workers": args.workers, "rows": rows}, args.out))
    return rows


if __name__ == "__main__":
    main()
