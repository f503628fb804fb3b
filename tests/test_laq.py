"""LAQ: quantizer bounds and packing, stale gradients, forced uploads, a plain n-worker
reference over 50 iterations in both wire modes, same collectives whatever the decisions."""

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_hooks as dh
from ddp_hooks._ext import cpu
from ddp_hooks.compress.bits import pack_codes, unpack_codes
from ddp_hooks.compress.laq import quantize_step
from ddp_hooks.testing import run_world

from models import value_errors


# ---------------------------------------------------------------- quantizer
def _quantize(grad, ref, bits):
    q, codes = torch.empty_like(grad), torch.empty(grad.numel(), dtype=torch.uint8)
    round_ = quantize_step(grad, ref, bits, q_new=q, codes=codes)
    return round_.radius, codes, q


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantization_error_within_tau_r_and_codes_fit_in_b_bits(bits):
    g = torch.Generator().manual_seed(bits)
    grad, ref = torch.randn(257, generator=g), torch.randn(257, generator=g)
    radius, codes, q = _quantize(grad, ref, bits)
    tau = 1 / (2**bits - 1)
    assert float(radius) == pytest.approx(float((grad - ref).abs().max()))
    assert ((grad - q).abs() <= tau * radius * (1 + 1e-5) + 1e-7).all()
    assert int(codes.max()) <= 2**bits - 1
    # the grid point is q_ref - R + 2 tau R code, exactly as a receiver rebuilds it
    torch.testing.assert_close(q, ref - radius + (2 * radius / (2**bits - 1)) * codes.float(), rtol=0, atol=1e-6)
    packed = pack_codes(codes, bits)
    assert packed.numel() == -(-257 * bits // 8)
    assert torch.equal(unpack_codes(packed, 257, bits), codes)


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_norms_of_the_round_match_plain_math(bits):
    g = torch.Generator().manual_seed(10 + bits)
    grad, ref = torch.randn(300, generator=g), torch.randn(300, generator=g)
    q, innovation = torch.empty(300), torch.empty(300)
    round_ = quantize_step(grad, ref, bits, q_new=q, innovation=innovation)
    torch.testing.assert_close(innovation, q - ref)
    assert float(round_.error2) == pytest.approx(float((grad - q).double().square().sum()), rel=1e-6)
    assert float(round_.innovation2) == pytest.approx(float((q - ref).double().square().sum()), rel=1e-6)


def test_zero_radius_gives_the_reference_back():
    ref = torch.randn(10)
    radius, codes, q = _quantize(ref.clone(), ref, 4)
    assert float(radius) == 0 and torch.equal(q, ref) and int(codes.sum()) == 0


def test_huge_gradient_keeps_the_norms_finite():
    # squares of 1e20 overflow float32: the rule's norms are float64
    round_ = quantize_step(
        torch.full((64,), 1e20), torch.zeros(64), 4, q_new=torch.empty(64), innovation=torch.empty(64)
    )
    assert torch.isfinite(round_.error2) and torch.isfinite(round_.innovation2)


# ---------------------------------------------------------------- n-worker reference
def _data(rank, samples=48, features=12, classes=3):
    # heterogeneous workers (feature scale grows with the rank): they decide differently
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(samples, features, generator=g) * (1 + rank)
    w = torch.randn(features, classes, generator=torch.Generator().manual_seed(0))
    y = (x @ w + 0.5 * torch.randn(samples, classes, generator=g)).argmax(1)
    return x, y


def _loss(model, x, y):
    reg = 0.01 * 0.5 * sum(p.square().sum() for p in model.parameters())
    return nn.functional.cross_entropy(model(x), y) + reg


def _model():
    torch.manual_seed(0)
    return nn.Linear(12, 3)


def _world(rank, world, iterations, settings, lr=0.5):
    model = _model()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    state = dh.LAQ.paper(**settings).register(ddp, opt)
    x, y = _data(rank)
    for _ in range(iterations):
        opt.zero_grad()
        _loss(ddp, x, y).backward()  # full local gradient (LAQ is a GD method)
        opt.step()
    stats = state.stats()
    return [p.detach().clone() for p in model.parameters()], stats["uploads"], stats["uploads_all_ranks"]


def laq_reference(
    world, iterations, bits=4, depth=10, xi=None, t_bar=100, lr=0.5, error_weight=3.0, offset=0.0, node_size=1
):
    """LAQ written plainly (mean convention: gradient = aggregate / M, threshold / lr^2). With
    ``node_size`` L, worker m is a node: its gradient is the mean of ranks m L ... m L + L - 1's."""
    xi = 0.8 / depth if xi is None else xi
    model = _model()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]
    q_ref = [torch.zeros_like(theta) for _ in range(world)]
    eps2_last = [0.0] * world
    clock = [t_bar] * world  # never uploaded: as stale as allowed, so round 0 uploads
    uploads = [0] * world
    aggregate = torch.zeros_like(theta)
    changes = []  # most recent first
    data = [_data(r) for r in range(world * node_size)]
    levels = 2**bits - 1
    for _ in range(iterations):
        grads = []
        for m in range(world):
            with torch.no_grad():
                for p, piece in zip(model.parameters(), theta.split([s.numel() for s in shapes])):
                    p.copy_(piece.view_as(p))
            total = None
            for r in range(m * node_size, (m + 1) * node_size):
                model.zero_grad()
                _loss(model, *data[r]).backward()
                g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                total = g if total is None else total + g
            grads.append(total * (1.0 / node_size) if node_size > 1 else total)
        history = (xi * depth / max(1, len(changes))) * sum(changes) / lr**2 if changes else 0.0
        delta_sum = torch.zeros_like(theta)
        for m in range(world):
            diff = grads[m] - q_ref[m]
            r = diff.abs().max()
            if r > 0:
                step = 2 * r / levels
                codes = torch.floor((diff + r) / step + 0.5).clamp(0, levels)
                q_new = q_ref[m] - r + step * codes
            else:
                q_new = q_ref[m].clone()
            eps2 = float((grads[m] - q_new).square().sum())
            innovation = q_new - q_ref[m]
            threshold = history + error_weight * (eps2 + eps2_last[m]) + offset
            if float(innovation.square().sum()) >= threshold or clock[m] >= t_bar:
                delta_sum += innovation
                q_ref[m], eps2_last[m], clock[m] = q_new, eps2, 0
                uploads[m] += 1
            else:
                clock[m] += 1
        aggregate += delta_sum
        new_theta = theta - lr * aggregate / world
        changes = ([float((new_theta - theta).square().sum())] + changes)[:depth]
        theta = new_theta
    return theta, uploads


@pytest.mark.device_branches
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("wire", ["dense", "uploads"])
def test_agrees_with_single_process_reference_over_50_iterations(world, wire):
    iterations = 50
    results = run_world(_world, world, iterations, {"bits": 4, "wire": wire})
    theta, uploads = laq_reference(world, iterations)
    for rank in range(world):
        got = torch.cat([p.reshape(-1) for p in results[rank][0]])
        torch.testing.assert_close(got, theta, rtol=1e-4, atol=1e-5)
        assert results[rank][1] == uploads[rank]
        assert results[rank][2] == sum(uploads)
    # lazy: far fewer uploads than rounds, and the ranks decided differently (so the same
    # collectives were issued whatever each rank decided)
    assert sum(uploads) < 0.7 * world * iterations
    assert len(set(uploads)) > 1 or world == 2


def _torch_codec_world(rank, world, *args):
    with cpu.disabled():
        return _world(rank, world, *args)


def test_torch_codec_agrees_with_single_process_reference():
    """The same agreement with the fused CPU loops switched off (the torch operations)."""
    iterations = 50
    results = run_world(_torch_codec_world, 2, iterations, {"bits": 4, "wire": "uploads"})
    theta, uploads = laq_reference(2, iterations)
    for rank in range(2):
        torch.testing.assert_close(torch.cat([p.reshape(-1) for p in results[rank][0]]), theta, rtol=1e-4, atol=1e-5)
        assert results[rank][1] == uploads[rank]


def test_skipping_workers_stale_gradient_is_used():
    # with uploads only every 4th round (t_bar forces them), the step still moves with the
    # stale aggregate: the model changes every round
    results = run_world(_world, 2, 8, {"bits": 4, "threshold_offset": 1e9, "max_staleness": 3})
    theta, uploads = laq_reference(2, 8, t_bar=3, offset=1e9)
    assert uploads == [2, 2]  # rounds 0 and 4
    assert results[0][1] == 2
    got = torch.cat([p.reshape(-1) for p in results[0][0]])
    torch.testing.assert_close(got, theta, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, torch.cat([p.detach().reshape(-1) for p in _model().parameters()]))


def test_t_bar_forces_an_upload():
    results = run_world(_world, 2, 12, {"bits": 4, "threshold_offset": 1e9, "max_staleness": 3})
    assert [r[1] for r in results] == [3, 3]  # rounds 0, 4 and 8, never otherwise
    results = run_world(_world, 2, 12, {"bits": 4, "threshold_offset": 1e9, "max_staleness": 100})
    assert [r[1] for r in results] == [1, 1]  # only the first round, which always uploads


def test_lag_and_qgd_settings():
    iterations = 20
    lag = run_world(_world, 2, iterations, {"quantize": False})
    qgd = run_world(_world, 2, iterations, {"skip": False})
    assert qgd[0][1] == iterations  # QGD uploads every round
    assert lag[0][1] < iterations
    theta, _ = laq_reference(2, iterations, bits=4, t_bar=100, error_weight=3.0, offset=-1e30)  # QGD
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in qgd[0][0]]), theta, rtol=1e-4, atol=1e-5)


def _bad_optimizers(rank, world):
    model = nn.Linear(3, 3)
    ddp = DDP(model)
    groups = [{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.2}]
    return value_errors(lambda: dh.LAQ().register(ddp, torch.optim.SGD(groups)), [{}]) + value_errors(
        lambda: dh.LAQ().register(ddp, torch.optim.AdamW(ddp.parameters())), [{}]
    )


def test_bad_arguments_and_optimizers_raise_value_error_naming_them():
    cases = ({"bits": 0}, {"bits": 9}, {"memory_depth": 0}, {"max_staleness": 0}, {"wire": "ring"})
    msgs = value_errors(dh.LAQ, cases) + run_world(_bad_optimizers, 1)[0]
    assert len(msgs) == 7
    for msg, name in zip(msgs, ["bits", "bits", "memory_depth", "max_staleness", "wire", "lr", "AdamW"]):
        assert name in msg, msg


def test_default_wire_sends_only_uploads():
    assert dh.LAQ().settings.wire == "uploads"
