"""Each fused kernel against its torch reference on small random inputs, before first use.

Inputs have odd sizes, tails that do not fill a word, blocks of one element, blocks longer
than a CTA, zeros (``sgn(0) = +1``) and ties. Signs, packing, indices and counts must agree
bit for bit; block scales and averages within float32 rounding of a different summation order
(``rtol 1e-6``); a top-k may break ties differently, so the kept magnitudes are compared. A
kernel that disagrees, or raises, is reported with the reason and switched off.
"""

from collections.abc import Callable
from typing import Any

import torch

from . import reference

Check = Callable[[Any, torch.device, torch.Generator], None]


def _data(n: int, device: torch.device, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=g)
    x[::7] = 0.0  # sgn(0) = +1
    x[3::11] = x[1]  # ties
    return x.to(device)


def _blocks(n: int, longest: int) -> list[tuple[int, int]]:
    sizes = [1, 5, longest, 3, 1]
    sizes.append(n - sum(sizes))
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    return list(zip(bounds, bounds[1:]))


def _offsets(blocks: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    return torch.tensor(reference.bounds(blocks), dtype=torch.int64, device=device)


def _sign(kernels: Any, device: torch.device, g: torch.Generator) -> None:
    for longest in (40, 5000):  # one-pass and two-pass kernels
        n = longest + 1000 + 13
        p, e = _data(n, device, g), _data(n, device, g)
        blocks = _blocks(n, longest)
        e_out = torch.full_like(p, float("nan"))
        packed, scales = kernels.sign_compress_ef(p, e, 0.5, _offsets(blocks, device), e_out, longest)
        v = p + 0.5 * e
        _same(packed, reference.pack_signs(v), "signs")
        _close(scales, reference.block_scales(v, blocks), "scales")
        _close(e_out, v - reference.decode(packed, scales, blocks, torch.empty_like(v)), "error")


def _average(kernels: Any, device: torch.device, g: torch.Generator) -> None:
    n, rows = 1013, 3
    blocks = _blocks(n, 500)
    signs = torch.stack([reference.pack_signs(_data(n, device, g)) for _ in range(rows)])
    scales = torch.rand(rows, len(blocks) + 2, generator=g).to(device)
    out = torch.full((n,), float("nan"), device=device)
    kernels.unpack_average(signs, scales, _offsets(blocks, device), out)
    want = torch.zeros(n, device=device)
    for i in range(rows):
        want += reference.decode(signs[i], scales[i], blocks, torch.empty(n, device=device))
    _close(out, want / rows, "average")


def _topk(kernels: Any, device: torch.device, g: torch.Generator) -> None:
    n, k = 4099, 37
    for sign in (False, True):
        p, e = _data(n, device, g), _data(n, device, g)
        v = p + e
        e_out = e.clone()
        idx, values = kernels.topk_ef(p, e_out, k, sign)
        if idx.numel() != k or idx.unique().numel() != k:
            raise AssertionError("top-k indices are not k distinct elements")
        _same(v.abs()[idx].sort().values, v.abs().topk(k).values.sort().values, "kept magnitudes")
        kept = v[idx]
        q = torch.where(kept >= 0, 1.0, -1.0) * kept.abs().sum(dtype=torch.float64).div(k).float() if sign else kept
        _close(values, q, "values")
        rest = v.clone()
        rest[idx] -= q
        _close(e_out, rest, "error")


def _threshold(kernels: Any, device: torch.device, g: torch.Generator) -> None:
    n = 3001
    p, e = _data(n, device, g), _data(n, device, g)
    v = p + e
    threshold = v.abs().median()
    e_out = e.clone()
    idx, values, count = kernels.threshold_ef(p, e_out, threshold, n)
    chosen = (v.abs() >= threshold).nonzero().flatten()
    if int(count) != chosen.numel():
        raise AssertionError(f"count {int(count)}, expected {chosen.numel()}")
    got = idx[: chosen.numel()]
    _same(got.sort().values, chosen, "indices")
    _same(values[: chosen.numel()], v[got], "values")
    rest = v.clone()
    rest[chosen] = 0
    _same(e_out, rest, "error")


CHECKS: dict[str, Check] = {
    "sign_compress_ef": _sign,
    "unpack_average": _average,
    "topk_ef": _topk,
    "threshold_ef": _threshold,
}


def check_all(kernels: Any, device_type: str) -> dict[str, str]:
    """'active', or 'off: <why>', for every kernel."""
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    out = {}
    for name, check in CHECKS.items():
        try:
            check(kernels, device, torch.Generator().manual_seed(1234))
            out[name] = "active"
        except Exception as exc:  # noqa: BLE001 - a kernel that fails its check is switched off
            out[name] = f"off: disagrees with its torch reference ({exc})".splitlines()[0]
    return out


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.shape != want.shape or not torch.equal(got, want):
        raise AssertionError(f"{what} differ")


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-6, atol=1e-6, equal_nan=True):
        raise AssertionError(f"{what} differ by more than float32 rounding")
