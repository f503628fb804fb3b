"""Fused CUDA kernels: they compile (nvcc, and the bindings against torch's headers, with the
flags torch.utils.cpp_extension uses), the torch path is taken where they cannot run, and on a
GPU each equals its torch reference."""

import inspect
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from ddp_hooks._ext import cuda as kernels
from ddp_hooks.compress import dispatch
from ddp_hooks.compress.bits import pack_signs
from ddp_hooks.compress.scaled_sign import block_scales, block_sizes, decode
from ddp_hooks.testing import run_world


def scaled_sign_decompress(packed, scales, blocks):
    return decode(packed, scales, blocks, torch.empty(blocks[-1][1], device=packed.device))


def _torch_build_flags(tmp_path, sources, with_cuda):
    """The (cflags, cuda_cflags) torch.utils.cpp_extension writes for building ``sources``:
    its own ninja file, generated here without building anything."""
    from torch.utils import cpp_extension

    write = cpp_extension._write_ninja_file_to_build_library
    src = kernels.source_dir()
    kwargs = {
        "path": str(tmp_path / "build.ninja"),
        "name": "ddp_hooks_kernels",
        "sources": sources,
        "extra_cflags": ["-O0"],
        "extra_cuda_cflags": ["-O3"],
        "extra_sycl_cflags": [],
        "extra_ldflags": [],
        "extra_include_paths": [str(src)],
        "with_cuda": with_cuda,
        "with_sycl": False,
        "is_standalone": False,
    }
    write(**{k: v for k, v in kwargs.items() if k in inspect.signature(write).parameters})
    lines = (tmp_path / "build.ninja").read_text().splitlines()

    def value(key):
        found = [line.split("=", 1)[1] for line in lines if line.startswith(f"{key} =")]
        return shlex.split(found[0]) if found else []

    return value("cflags") + value("post_cflags"), value("cuda_cflags") + value("cuda_post_cflags")


# ---------------------------------------------------------------- build checks (no GPU needed)
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", ["sign.cu", "topk.cu"])
def test_kernels_compile_with_nvcc_for_sm90_and_ptx(source, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    src = kernels.source_dir()
    _, cuda_flags = _torch_build_flags(tmp_path, [str(src / source)], with_cuda=True)
    std = [f for f in cuda_flags if f.startswith("-std=")]
    done = subprocess.run(
        [
            "nvcc",
            "-c",
            str(src / source),
            "-o",
            str(tmp_path / "k.o"),
            "-O3",
            *std,
            f"-I{src}",
            "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_bindings_compile_against_torch_headers_with_torch_flags(tmp_path):
    src = kernels.source_dir()
    cflags, _ = _torch_build_flags(tmp_path, [str(src / "bindings.cpp")], with_cuda=False)
    assert any(f.startswith("-std=") for f in cflags), cflags
    done = subprocess.run(
        ["g++", "-c", str(src / "bindings.cpp"), "-o", str(tmp_path / "b.o"), *cflags], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_sources_are_found():
    src = kernels.source_dir()
    assert all((src / s).exists() for s in kernels.SOURCES)


def test_env_switch_forces_the_torch_path():
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "import ddp_hooks.kernels as k\n"
        "from ddp_hooks._ext import cuda\n"
        "assert cuda.EXTENSION.get() is None and cuda.EXTENSION.get() is None\n"
        "print(k.status())\n"
    )
    env = {**os.environ, "DDP_HOOKS_NO_CUDA_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("fused CUDA kernels off") == 1  # one log line, however often asked
    assert "'topk_ef': 'off: DDP_HOOKS_NO_CUDA_EXT=1'" in out.stdout


def test_without_the_extension_nothing_dispatches():
    assert not dispatch.usable("topk_ef", torch.zeros(4), torch.zeros(4))


def test_dispatch_knows_every_compiled_function_and_refuses_other_names():
    for name in kernels.KERNELS:
        dispatch.usable(name, torch.zeros(4))
    with pytest.raises(ValueError, match="kernel must be one of"):
        dispatch.usable("pack_sign", torch.zeros(4))


# ---------------------------------------------------------------- the dispatch path, through a stand-in
@pytest.fixture
def standin():
    import cuda_standin

    for key in cuda_standin.CALLS:
        cuda_standin.CALLS[key] = 0
    dispatch.install(cuda_standin, "cpu")
    yield cuda_standin
    dispatch.uninstall()


def test_standin_passes_the_check_at_load_and_is_used(standin):
    status = dispatch.status()
    assert {k: status[k] for k in kernels.KERNELS} == dict.fromkeys(kernels.KERNELS, "active")
    assert dispatch.usable("sign_compress_ef", torch.zeros(3))
    assert not dispatch.usable("sign_compress_ef", torch.zeros(3).expand(2, 3).t())  # not contiguous


def test_a_kernel_that_disagrees_is_switched_off_with_one_log_line(standin, monkeypatch, caplog):
    good = standin.topk_ef

    def wrong(p, e, k, sign, stream):
        idx, values = good(p, e, k, sign, stream)
        return [idx.flip(0), values]  # the right set, the values against the wrong indices

    monkeypatch.setattr(standin, "topk_ef", wrong)
    dispatch.install(standin, "cpu")
    with caplog.at_level("WARNING", logger="ddp_hooks"):
        status = dispatch.status()
        dispatch.status()
    assert status["topk_ef"].startswith("off: disagrees with its torch reference")
    assert all(status[k] == "active" for k in kernels.KERNELS if k != "topk_ef")
    assert sum("topk_ef switched off" in r.getMessage() for r in caplog.records) == 1
    assert not dispatch.usable("topk_ef", torch.zeros(3), torch.zeros(3))


def _standin_world(rank, world, test_module, fn_name, *args):
    import importlib

    import cuda_standin

    dispatch.install(cuda_standin, "cpu")
    fn = getattr(importlib.import_module(test_module), fn_name)
    return fn(rank, world, *args), dict(cuda_standin.CALLS)


@pytest.mark.parametrize("topology", ["sharded", "allgather"])
def test_ef_sgdm_through_the_kernels_api_agrees_with_the_reference(topology):
    from test_ef_signsgdm import _expected

    steps, world = 8, 2
    results = run_world(
        _standin_world,
        world,
        "test_ef_signsgdm",
        "_reference_world",
        steps,
        0.9,
        True,
        topology,
        None,
        torch.float32,
        0.0005,
    )
    calls = results[0][1]
    assert calls["sign_compress_ef"] > 0 and calls["unpack_average_out"] > 0, calls
    expected = _expected([r[0] for r in results], world, steps)
    for rank in range(world):
        for t in range(steps):
            for got, want in zip(results[rank][0][1][t], expected[t]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("period", [1, 4])
def test_qsparse_through_the_kernels_api_agrees_with_the_reference(period):
    from test_qsparse import qsparse_reference

    steps, k, world = 8, 10, 2
    results = run_world(_standin_world, world, "test_qsparse", "_world", steps, period, k, True)
    assert results[0][1]["topk_ef"] > 0
    expected, _ = qsparse_reference(world, steps, period, k, True)
    for rank in range(world):
        for got, want in zip(results[rank][0][0], expected[rank]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- GPU: kernels vs references
gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or kernels.EXTENSION.get() is None, reason="needs a CUDA GPU and a built extension"
)
SIZES = [1, 31, 33, 1000, 100_003]


def _close(got, want):  # another summation order: float32 rounding (as the check at load)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _offsets(n, g):
    cuts = sorted(set(torch.randint(1, max(2, n), (5,), generator=g).tolist()) - {0, n}) if n > 2 else []
    return [0, *cuts, n]


@gpu
@pytest.mark.parametrize("n", SIZES)
def test_sign_compress_ef_is_bit_exact(n):
    g = torch.Generator().manual_seed(n)
    p, e = torch.randn(n, generator=g).cuda(), torch.randn(n, generator=g).cuda()
    bounds = _offsets(n, g)
    blocks = list(zip(bounds, bounds[1:]))
    e_out = torch.full_like(p, float("nan"))  # poisoned
    packed, scales = kernels.sign_compress_ef(p, e, 1.0, torch.tensor(bounds, device="cuda"), e_out, 0)
    v = p + e
    assert torch.equal(packed, pack_signs(v))
    _close(scales, block_scales(v, blocks))
    assert torch.equal(e_out, v - scaled_sign_decompress(pack_signs(v), scales, blocks))


@gpu
@pytest.mark.parametrize("n", [1, 31, 33, 1000, 100_003, 1 << 20])
@pytest.mark.parametrize("block_size", [1, 5, 32, 33, 1000, 4096])
def test_one_pass_sign_compress_ef_is_bit_exact(n, block_size):
    """CTA-sized blocks (unaligned to words, several per word, one per CTA): the one-pass kernel
    gives the reference's signs, padding bits, scales and error, and the two-pass kernel's."""
    g = torch.Generator().manual_seed(n + block_size)
    p, e = torch.randn(n, generator=g).cuda(), torch.randn(n, generator=g).cuda()
    sizes = block_sizes(_sizes(n, g), block_size)
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    blocks = list(zip(bounds, bounds[1:]))
    offsets = torch.tensor(bounds, device="cuda")
    e_out = torch.full_like(p, float("nan"))  # poisoned
    packed, scales = kernels.sign_compress_ef(p, e, 0.5, offsets, e_out, max(sizes))
    v = p + 0.5 * e
    assert torch.equal(packed, pack_signs(v))
    _close(scales, block_scales(v, blocks))
    assert torch.equal(e_out, v - scaled_sign_decompress(pack_signs(v), scales, blocks))
    two_pass_e = torch.full_like(p, float("nan"))
    two_packed, two_scales = kernels.sign_compress_ef(p, e, 0.5, offsets, two_pass_e, 0)
    assert torch.equal(packed, two_packed) and torch.equal(scales, two_scales) and torch.equal(e_out, two_pass_e)


def _sizes(n, g):
    """Random tensor sizes summing to n (the per-tensor split before block_size cuts)."""
    cuts = sorted(set(torch.randint(1, max(2, n), (7,), generator=g).tolist()) - {0, n}) if n > 2 else []
    bounds = [0, *cuts, n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


@gpu
@pytest.mark.parametrize("n", SIZES)
def test_unpack_average_is_bit_exact(n):
    g = torch.Generator().manual_seed(n)
    rows_v = torch.randn(4, n, generator=g).cuda()
    bounds = _offsets(n, g)
    blocks = list(zip(bounds, bounds[1:]))
    rows = torch.stack([pack_signs(r) for r in rows_v])
    scales = torch.stack([block_scales(r, blocks) for r in rows_v])
    out = torch.full((n,), float("nan"), device="cuda")
    kernels.unpack_average(rows, scales, torch.tensor(bounds, device="cuda"), out)
    acc = torch.zeros(n, device="cuda")
    for r in range(4):
        acc.add_(scaled_sign_decompress(rows[r], scales[r], blocks))
    _close(out, acc.div_(4))


@gpu
@pytest.mark.parametrize("n,k", [(33, 5), (1000, 10), (1_000_003, 10_000)])
@pytest.mark.parametrize("sign", [False, True])
def test_topk_ef_selects_torch_topk_set(n, k, sign):
    g = torch.Generator().manual_seed(n + k)
    p, e = torch.randn(n, generator=g).cuda(), torch.randn(n, generator=g).cuda()
    v = p + e
    idx, values = kernels.topk_ef(p, e, k, sign)
    assert set(idx.tolist()) == set(torch.topk(v.abs(), k).indices.tolist())
    kept = v[idx]
    if sign:
        scale = (kept.abs().double().sum() / k).float()
        torch.testing.assert_close(values, torch.where(kept >= 0, scale, -scale), rtol=0, atol=0)
    else:
        assert torch.equal(values, kept)
    expected = v.clone()
    expected[idx] = kept - values
    assert torch.equal(e, expected)


@gpu
def test_threshold_ef_selects_everything_above_the_threshold():
    g = torch.Generator().manual_seed(0)
    p, e = torch.randn(100_001, generator=g).cuda(), torch.randn(100_001, generator=g).cuda()
    v = p + e
    threshold = torch.tensor(2.5, device="cuda")
    idx, values, count = kernels.threshold_ef(p, e, threshold, 20_000)
    above = (v.abs() >= 2.5).nonzero().view(-1)
    assert int(count) == above.numel()
    assert set(idx[: above.numel()].tolist()) == set(above.tolist())
    assert torch.equal(e[above], torch.zeros_like(e[above]))
