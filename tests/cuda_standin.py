"""A stand-in for the compiled CUDA extension: the same functions, argument order, dtypes,
workspaces and outputs as cuda_kernels/bindings.cpp, computed with the torch references on
any device. Installed with ``ddp_hooks.compress.dispatch.install(module, "cpu")``, it lets the suite
run every dispatch path of the compress layer without a GPU; ``CALLS`` counts the calls."""

import torch

from ddp_hooks.compress import bits, scaled_sign

CALLS: dict[str, int] = {"sign_compress_ef": 0, "unpack_average_out": 0, "topk_ef": 0, "threshold_ef": 0}


def _blocks(offsets: torch.Tensor) -> list[tuple[int, int]]:
    bounds = offsets.tolist()
    return list(zip(bounds, bounds[1:]))


def sign_compress_ef(p, e, rho, offsets, e_out, stream, one_pass):  # noqa: ARG001 - the binding's signature
    CALLS["sign_compress_ef"] += 1
    assert p.dtype == e.dtype == e_out.dtype == torch.float32 and offsets.dtype == torch.int64
    assert isinstance(rho, float) and isinstance(one_pass, bool) and isinstance(stream, int)
    v = p + rho * e
    blocks = _blocks(offsets)
    scales = scaled_sign.block_scales(v, blocks)
    packed = bits.pack_signs(v)
    e_out.copy_(v - scaled_sign.decode(packed, scales, blocks, torch.empty_like(v)))
    return [packed, scales]


def unpack_average_out(rows, scales, offsets, out, stream):  # noqa: ARG001
    CALLS["unpack_average_out"] += 1
    assert rows.dtype == torch.uint8 and rows.dim() == 2 and scales.dim() == 2 and scales.shape[0] == rows.shape[0]
    blocks = _blocks(offsets)
    n = blocks[-1][1]
    acc = torch.zeros(n, device=out.device)
    for i in range(rows.shape[0]):
        acc.add_(scaled_sign.decode(rows[i], scales[i], blocks, torch.empty(n, device=out.device)))
    out.zero_()
    out[:n].copy_(acc.div_(rows.shape[0]))
    return out


def topk_ef(p, e, k, sign, stream):  # noqa: ARG001
    CALLS["topk_ef"] += 1
    assert isinstance(k, int) and isinstance(sign, bool)
    v = p + e
    idx = torch.topk(v.abs(), k, sorted=False).indices
    kept = v[idx]
    if sign:
        scale = kept.abs().sum(dtype=torch.float64).div(k).to(torch.float32)
        values = torch.where(kept >= 0, scale, -scale)
    else:
        values = kept.clone()
    v[idx] -= values
    e.copy_(v)
    return [idx, values]


def threshold_ef(p, e, threshold, capacity, stream):  # noqa: ARG001
    CALLS["threshold_ef"] += 1
    v = p + e
    chosen = (v.abs() >= threshold).nonzero().flatten()[:capacity]
    idx = torch.zeros(capacity, dtype=torch.int64, device=p.device)
    values = torch.zeros(capacity, device=p.device)
    idx[: chosen.numel()] = chosen
    values[: chosen.numel()] = v[chosen]
    v[chosen] = 0
    e.copy_(v)
    return [idx, values, torch.tensor([chosen.numel()], device=p.device)]
