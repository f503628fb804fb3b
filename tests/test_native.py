"""The fused CPU loops of ddp_hooks._ext.cpu against the torch references of ddp_hooks.compress:
fresh random inputs, odd sizes and tails, outputs poisoned before each call, one and two
threads (a bucket split over threads)."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from ddp_hooks._ext import cpu as native
from ddp_hooks.compress import bits as bitpack
from ddp_hooks.compress import scaled_sign as sign
from ddp_hooks.compress.bits import pack_codes, unpack_codes
from ddp_hooks.compress.laq import add_dequantized, apply_codes, quantize_step
from ddp_hooks.compress.sign_worker import Momentum, WorkerBuffers, ef_input

pytestmark = pytest.mark.skipif(not native.available(), reason=f"fused CPU codec {native.status()}")


def _codes_of(q, q_ref, radius, bits):
    """The uint8 codes of a grid point ``q`` (plain inverse of the quantizer's grid)."""
    levels = (1 << bits) - 1
    safe = torch.where(radius > 0, radius, torch.ones_like(radius))
    return ((q - q_ref + radius) / (2 * safe / levels)).round_().clamp_(0, levels).to(torch.uint8)


def _round(g, q_ref, bits, q_new=None, innovation=None, codes=None):
    r = quantize_step(g, q_ref, bits, q_new=q_new, innovation=innovation, codes=codes)
    return r.radius, r.error2, r.innovation2


SIZES = [1, 7, 8, 9, 1001, native.CHUNK * 2 + 13]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _input(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 10
    x[::17] = 0.0
    x[5::19] = -0.0
    return x


def _blocks(n, seed):
    """Random contiguous blocks from 0 covering ``n`` (a few of length 1)."""
    g = torch.Generator().manual_seed(seed + 1)
    cuts = sorted({0, n, *torch.randint(1, max(2, n), (min(n, 40),), generator=g).tolist()})
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


@pytest.mark.parametrize("n", SIZES)
def test_compress_matches_torch_reference(n, threads):
    x, blocks = _input(n, n), _blocks(n, n)
    res = torch.full_like(x, float("nan"))
    packed, scales = sign.compress(x, blocks, res)
    with native.disabled():
        ref_res = torch.full_like(x, float("nan"))
        ref_packed, ref_scales = sign.compress(x, blocks, ref_res)
    assert torch.equal(packed, ref_packed)  # signs and padding bits exact
    # float64 sums in another order round to the same float32 but for rare ties
    torch.testing.assert_close(scales, ref_scales, rtol=1e-7, atol=0)
    if torch.equal(scales, ref_scales):
        assert torch.equal(res, ref_res)
    else:
        torch.testing.assert_close(res, ref_res, rtol=1e-6, atol=1e-6)
    # the residual is exactly x - C(x) for the scales returned
    decoded = sign.decode(packed, scales, blocks, torch.full_like(x, float("nan")))
    assert torch.equal(res, x - decoded)


@pytest.mark.parametrize("n", SIZES)
def test_pack_and_scales_match_torch_reference(n, threads):
    x, blocks = _input(n, 3 * n), _blocks(n, 3 * n)
    x[n // 2] = float("nan")  # NaN packs as 0, like x >= 0 in torch
    got = bitpack.pack_signs(x)
    with native.disabled():
        want = bitpack.pack_signs(x)
        want_scales = sign.block_scales(x.nan_to_num(), blocks)
    assert torch.equal(got, want)
    torch.testing.assert_close(sign.block_scales(x.nan_to_num(), blocks), want_scales, rtol=1e-7, atol=0)


@pytest.mark.parametrize("n", SIZES)
def test_decode_and_accumulate_match_torch_reference(n, threads):
    blocks = _blocks(n, 5 * n)
    packed = bitpack.pack_signs(_input(n, 5 * n))
    scales = torch.rand(len(blocks) + 3)  # extra (padding) scales are ignored
    base = _input(n, 7 * n)
    out = sign.decode(packed, scales, blocks, torch.full((n,), float("nan")))
    acc = sign.decode(packed, scales, blocks, base.clone(), accumulate=True)
    with native.disabled():
        ref = sign.decode(packed, scales, blocks, torch.full((n,), float("nan")))
        ref_acc = sign.decode(packed, scales, blocks, base.clone(), accumulate=True)
    assert torch.equal(out, ref) and torch.equal(acc, ref_acc)


@pytest.mark.parametrize("momentum,nesterov", [(None, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("with_error", [True, False])
def test_worker_input_matches_torch_ops(momentum, nesterov, with_error, threads):
    n = native.CHUNK + 1001
    g, m, e = _input(n, 1), _input(n, 2), _input(n, 3)
    error = (e, 0.7) if with_error else None
    outs = []
    for off in (False, True):
        m_out, p = torch.full_like(g, float("nan")), torch.full_like(g, float("nan"))
        out = WorkerBuffers(p, m_out, torch.empty(0))
        with native.disabled() if off else contextlib.nullcontext():
            ef_input(g, None if momentum is None else m, Momentum(momentum or 0.0, nesterov), error, out)
        outs.append((m_out, p))
    (m_got, p_got), (m_want, p_want) = outs
    # inputs up to ~30 in magnitude: a few float32 roundings in another order
    torch.testing.assert_close(p_got, p_want, rtol=1e-6, atol=2e-5)
    if momentum is not None:
        torch.testing.assert_close(m_got, m_want, rtol=1e-6, atol=2e-5)


def test_bounds_must_be_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        native.bounds_of([(0, 3), (4, 6)])


def test_env_switch_and_missing_compiler_fall_back():
    code = "from ddp_hooks._ext import cpu; print(cpu.status())"
    env = dict(os.environ, DDP_HOOKS_NO_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "off: DDP_HOOKS_NO_NATIVE=1"
    env = dict(os.environ, CC="no-such-compiler", PATH="/nonexistent", DDP_HOOKS_CACHE=os.devnull + "-none")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("off: no C compiler")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_laq_quantize_step_matches_torch_reference(n, bits, threads):
    g, q_ref = _input(n, 11 * n), _input(n, 13 * n)
    outs = []
    for off in (False, True):
        q_new, innovation = torch.full_like(g, float("nan")), torch.full_like(g, float("nan"))
        codes = torch.full((n,), 255, dtype=torch.uint8)
        with native.disabled() if off else contextlib.nullcontext():
            radius, eps2, inno2 = _round(g, q_ref, bits, q_new, innovation, codes)
        outs.append((radius, eps2, inno2, q_new, innovation, codes))
    got, want = outs
    assert torch.equal(got[0], want[0])  # the same radius
    assert torch.equal(got[3], want[3]) and torch.equal(got[4], want[4])  # the same grid point, bit for bit
    assert torch.equal(got[5], want[5]) and torch.equal(got[5], _codes_of(got[3], q_ref, got[0], bits))
    q_new, innovation = got[3], got[4]
    truth = [(g.double() - q_new.double()).square().sum(), innovation.double().square().sum()]
    for a, b, t in zip(got[1:3], want[1:3], truth):  # float64 sums in both, in another order
        torch.testing.assert_close(a.double(), t, rtol=1e-6, atol=1e-30)
        torch.testing.assert_close(b.double(), t, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
def test_laq_codes_only_round_then_apply_gives_the_same_grid_point(n, bits, fused, threads):
    """Asking only for the codes gives the same codes and norms, and apply_codes rebuilds the
    quantizer's q_new from them bit for bit (also when nothing changed, radius 0)."""
    for g, q_ref in ((_input(n, 11 * n), _input(n, 13 * n)), (_input(n, 3), _input(n, 3))):
        q_new, innovation = torch.full_like(g, float("nan")), torch.full_like(g, float("nan"))
        codes_full = torch.full((n,), 255, dtype=torch.uint8)
        codes = torch.full((n,), 255, dtype=torch.uint8)
        ctx = native.disabled() if not fused else contextlib.nullcontext()
        with ctx:
            full = _round(g, q_ref, bits, q_new, innovation, codes_full)
            lean = _round(g, q_ref, bits, None, None, codes)
            rebuilt = apply_codes(q_ref.clone(), codes, lean[0], bits)
        assert all(torch.equal(a, b) for a, b in zip(full, lean))
        assert torch.equal(codes, codes_full)
        assert torch.equal(rebuilt, q_new)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001, native.CHUNK * 2 + 13])
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_laq_code_packing_and_reconstruction_match_torch_reference(n, bits, threads):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n + bits)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    base, radius = _input(n, 17 * n), torch.tensor(0.37)
    got = add_dequantized(base.clone(), packed, radius, bits)
    with native.disabled():
        want_packed = pack_codes(codes, bits)
        want = add_dequantized(base.clone(), want_packed, radius, bits)
    assert torch.equal(packed, want_packed)
    assert torch.equal(unpack_codes(packed, n, bits), codes)
    assert torch.equal(got, want)


def test_laq_quantize_step_without_change_and_with_nan():
    g = _input(1001, 1)
    q_new, innovation = torch.empty_like(g), torch.empty_like(g)
    radius, eps2, inno2 = _round(g, g.clone(), 4, q_new, innovation)
    assert float(radius) == 0 and float(eps2) == 0 and float(inno2) == 0 and torch.equal(q_new, g)
    bad = g.clone()
    bad[500] = float("nan")
    radius, *_ = _round(bad, g, 4, q_new, innovation)
    assert torch.isnan(radius)


def test_sqdiff_copy():
    src, dst = _input(native.CHUNK + 77, 1), _input(native.CHUNK + 77, 2)
    want = float((dst.double() - src.double()).square().sum())
    assert native.sqdiff_copy(src, dst) == pytest.approx(want, rel=1e-12)
    assert torch.equal(dst, src)
