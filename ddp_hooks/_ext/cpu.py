"""Fused CPU loops for the scaled-sign codec and LAQ's quantizer, built on first use with the
system C compiler.

The torch reference in :mod:`ddp_hooks.compress` runs one tensor operation per step of the
math, so a bucket is read and written five to ten times; on a CPU with a few cores per worker
that costs more than the bytes it saves on a 1 Gb/s link. ``csrc/cpu_codec.c`` fuses those
passes (plain C, no Python headers). It is compiled once per source version and machine into
the cache directory (``$DDP_HOOKS_CACHE``, else ``$XDG_CACHE_HOME/ddp_hooks``, else
``~/.cache/ddp_hooks``) and called through :mod:`ctypes`, which releases the GIL; a bucket is
split over ``torch.get_num_threads()`` threads.

``DDP_HOOKS_NO_NATIVE=1`` forces the torch reference; so does a missing compiler or a failed
build (one log line says why). Results equal the torch reference's up to float rounding of the
fused arithmetic (the signs, packing and decoding are exact; block sums are accumulated in
float64 in both). Only :mod:`ddp_hooks.compress` calls these functions.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .loader import Extension

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_codec.c"
FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-trapping-math"]
CHUNK = 1 << 20  # elements per thread task (a multiple of 8)

_pool_lock = threading.Lock()
_pool: dict[str, Any] = {"pool": None, "threads": 0}

_i64, _f32, _int, _vp = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "dh_ef_input": [_i64, _i64, _vp, _vp, _vp, _f32, _int, _vp, _f32, _vp],
    "dh_block_abs_sums": [_i64, _i64, _vp, _i64, _vp, _vp],
    "dh_pack_signs": [_i64, _i64, _i64, _vp, _vp],
    "dh_sign_decode": [_i64, _i64, _vp, _i64, _vp, _vp, _vp, _int],
    "dh_init": [],
    "dh_pack_residual": [_i64, _i64, _i64, _vp, _i64, _vp, _vp, _vp, _vp],
    "dh_absmax_diff": [_i64, _i64, _vp, _vp],
    "dh_laq_quantize": [_i64, _i64, _vp, _vp, _f32, _f32, _f32, _f32, _vp, _vp, _vp, _vp],
    "dh_pack_codes": [_i64, _i64, _i64, _vp, _int, _vp],
    "dh_unpack_dequantize": [_i64, _i64, _i64, _vp, _int, _f32, _f32, _vp, _int],
    "dh_sqdiff_copy": [_i64, _i64, _vp, _vp],
    "dh_laq_apply_codes": [_i64, _i64, _vp, _f32, _f32, _vp],
}
_RESTYPES = {"dh_absmax_diff": ctypes.c_float, "dh_sqdiff_copy": ctypes.c_double}


def cache_dir() -> Path:
    root = os.environ.get("DDP_HOOKS_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ddp_hooks"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _compile() -> Path:
    cc = _compiler()
    assert cc is not None  # checked by _why_not
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS + [cc, platform.machine()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_codec-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # every rank may build at once: compile to a private name, then rename atomically
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip().splitlines()[:1]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _build() -> Any:
    lib = ctypes.CDLL(str(_compile()))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, _RESTYPES.get(name)
    lib.dh_init()
    return lib


def _why_not() -> str | None:
    return None if _compiler() else "no C compiler (set CC, or install cc/gcc/clang)"


EXTENSION = Extension("fused CPU codec", "DDP_HOOKS_NO_NATIVE", _build, _why_not)
load = EXTENSION.get
available = EXTENSION.available
status = EXTENSION.status
disabled = EXTENSION.disabled


#: the functions below that run the fused loops (names for ``compress.dispatch.usable``)
KERNELS = tuple(
    "ef_input block_scales pack_signs pack_residual sign_decode absmax_diff laq_quantize laq_apply_codes "
    "pack_codes unpack_dequantize sqdiff_copy".split()
)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


Chunks = list[tuple[int, int]]


def _chunks(n: int) -> Chunks:
    """``[0, n)`` cut into one range per intra-op thread (boundaries multiples of 8)."""
    threads = torch.get_num_threads()
    if threads <= 1 or n <= CHUNK:
        return [(0, n)]
    step = max(CHUNK, (-(-n // threads) + 7) // 8 * 8)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _map(fn: Callable[[int, int, int], Any], chunks: Chunks) -> list[Any]:
    """``[fn(i, lo, hi) for each chunk]``, on the thread pool when there are several."""
    if len(chunks) == 1:
        return [fn(0, *chunks[0])]
    threads = torch.get_num_threads()
    with _pool_lock:
        if _pool["threads"] != threads:
            if _pool["pool"] is not None:
                _pool["pool"].shutdown(wait=False)
            _pool["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="ddp_hooks_codec")
            _pool["threads"] = threads
        pool = _pool["pool"]
    return list(pool.map(lambda i: fn(i, *chunks[i]), range(len(chunks))))


def _run(name: str, n: int, args: tuple[Any, ...]) -> list[Any]:
    """``lib.name(lo, hi, *args)`` over ``[0, n)``, split over torch's intra-op threads; the
    results in chunk order."""
    fn = getattr(load(), name)
    return _map(lambda _, lo, hi: fn(lo, hi, *args), _chunks(n))


def bounds_of(blocks: list[tuple[int, int]]) -> torch.Tensor:
    """Contiguous blocks ``[(lo, hi), ...]`` as an int64 tensor of their ``len + 1`` bounds."""
    for (_, hi), (lo, _) in zip(blocks, blocks[1:]):
        if hi != lo:
            raise ValueError("the fused codec takes contiguous blocks")
    return torch.tensor([blocks[0][0]] + [hi for _, hi in blocks], dtype=torch.int64)


def ef_input(
    g: torch.Tensor,
    momentum: torch.Tensor | None,
    momentum_out: torch.Tensor,
    p: torch.Tensor,
    *,
    mu: float,
    nesterov: bool,
    error: torch.Tensor | None,
    rho: float,
) -> torch.Tensor:
    """``p`` = the worker's compressor input: ``m' = g + mu m`` into ``momentum_out`` and
    ``p = (g + mu m' if nesterov else m') + rho e`` (no momentum when ``momentum`` is None)."""
    mode = 0 if momentum is None else (2 if nesterov else 1)
    args = (_ptr(g), _ptr(momentum), _ptr(momentum_out), float(mu), mode, _ptr(error), float(rho), _ptr(p))
    _run("dh_ef_input", p.numel(), args)
    return p


def block_scales(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """``sum |x_b| / d_b`` per block (float64 sums rounded once to float32)."""
    nblocks = bounds.numel() - 1
    chunks = _chunks(int(bounds[-1]))
    partial = torch.empty(len(chunks), nblocks, dtype=torch.float64)
    fn = load().dh_block_abs_sums
    _map(lambda i, lo, hi: fn(lo, hi, x.data_ptr(), nblocks, bounds.data_ptr(), partial[i].data_ptr()), chunks)
    sizes = (bounds[1:] - bounds[:-1]).to(torch.float64)
    return (partial.sum(0) / sizes).to(torch.float32)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """``x >= 0`` packed 8 per byte, LSB first, padding bits 1 (``ceil(n/8)`` uint8)."""
    n = x.numel()
    out = torch.empty(-(-n // 8), dtype=torch.uint8)
    _run("dh_pack_signs", -(-n // 8) * 8, (n, x.data_ptr(), out.data_ptr()))
    return out


def pack_residual(x: torch.Tensor, bounds: torch.Tensor, scales: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """:func:`pack_signs` of all of ``x``, and within the blocks ``residual = x - (+-scale)`` by
    the sign of ``x``, in one pass; returns the packed signs."""
    n = x.numel()
    out = torch.empty(-(-n // 8), dtype=torch.uint8)
    args = (
        n,
        x.data_ptr(),
        bounds.numel() - 1,
        bounds.data_ptr(),
        scales.data_ptr(),
        out.data_ptr(),
        residual.data_ptr(),
    )
    _run("dh_pack_residual", -(-n // 8) * 8, args)
    return out


def sign_decode(
    packed: torch.Tensor, bounds: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, accumulate: bool = False
) -> torch.Tensor:
    """Within the blocks: ``out (+)= +-scale`` by the packed sign bits."""
    args = (
        packed.data_ptr(),
        bounds.numel() - 1,
        bounds.data_ptr(),
        scales.data_ptr(),
        out.data_ptr(),
        int(accumulate),
    )
    _run("dh_sign_decode", int(bounds[-1]), args)
    return out


def absmax_diff(g: torch.Tensor, q: torch.Tensor) -> float:
    """``max |g - q|`` (NaN if any difference is NaN; 0 for empty tensors)."""
    parts = _run("dh_absmax_diff", g.numel(), (g.data_ptr(), q.data_ptr()))
    return float("nan") if any(v != v for v in parts) else max(parts)


def laq_quantize(
    g: torch.Tensor,
    q_ref: torch.Tensor,
    grid: tuple[float, float, float, int],
    q_new: torch.Tensor | None,
    innovation: torch.Tensor | None,
    codes: torch.Tensor | None = None,
) -> tuple[float, float]:
    """LAQ's grid quantization in one pass (see csrc/cpu_codec.c); ``grid`` is (radius, step,
    unit, levels). Writes ``q_new``, ``innovation = q_new - q_ref`` and the uint8 ``codes``,
    each only if given; returns (``||g - q_new||^2``, ``||innovation||^2``), float64 sums."""
    chunks = _chunks(g.numel())
    sums = torch.zeros(len(chunks), 2, dtype=torch.float64)
    radius, step, unit, levels = grid
    head = (g.data_ptr(), q_ref.data_ptr(), radius, step, unit, float(levels))
    tail = (_ptr(q_new), _ptr(innovation), _ptr(codes))
    fn = load().dh_laq_quantize
    _map(lambda i, lo, hi: fn(lo, hi, *head, *tail, sums[i].data_ptr()), chunks)
    total = sums.sum(0)
    return float(total[0]), float(total[1])


def laq_apply_codes(codes: torch.Tensor, radius: float, unit: float, q_ref: torch.Tensor) -> torch.Tensor:
    """``q_ref = codes * unit + q_ref - radius`` in place: the ``q_new`` that :func:`laq_quantize`
    computed with these codes, radius and unit, float for float."""
    _run("dh_laq_apply_codes", codes.numel(), (codes.data_ptr(), radius, unit, q_ref.data_ptr()))
    return q_ref


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of ``bits`` bits each, packed LSB first into ``ceil(n * bits / 8)`` bytes."""
    n = codes.numel()
    out = torch.empty(-(-n * bits // 8), dtype=torch.uint8)
    _run("dh_pack_codes", n, (n, codes.data_ptr(), int(bits), out.data_ptr()))
    return out


def unpack_dequantize(
    packed: torch.Tensor, n: int, bits: int, grid: tuple[float, float], out: torch.Tensor, accumulate: bool = False
) -> torch.Tensor:
    """``out (+)= (0 - radius) + unit * code`` for the ``n`` codes packed in ``packed``;
    ``grid`` is (radius, unit)."""
    radius, unit = grid
    args = (n, packed.data_ptr(), int(bits), float(radius), float(unit), out.data_ptr(), int(accumulate))
    _run("dh_unpack_dequantize", n, args)
    return out


def sqdiff_copy(src: torch.Tensor, dst: torch.Tensor) -> float:
    """``||dst - src||^2`` (float64 sum), then ``dst = src``."""
    return float(sum(_run("dh_sqdiff_copy", src.numel(), (src.data_ptr(), dst.data_ptr()))))
