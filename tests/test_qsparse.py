"""Qsparse-local-SGD: operators against plain math, unbiased quantizer, a plain n-worker
reference for the local-SGD and the H = 1 hook paths, memory wipe, payload sizes."""

import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_hooks as dh
from ddp_hooks.compress.sparse import KINDS, Codec, quantize, stochastic_levels, top_indices
from ddp_hooks.testing import run_world

from models import batches, params_of, value_errors


# ---------------------------------------------------------------- operators
def test_topk_selects_the_same_set_as_torch_topk():
    g = torch.Generator().manual_seed(0)
    for numel, k in [(10, 3), (1000, 17), (4097, 400)]:
        v = torch.randn(numel, generator=g)  # continuous: no ties
        ours = set(top_indices(v, k).tolist())
        assert ours == set(torch.topk(v.abs(), k).indices.tolist())


def test_signtopk_math_against_plain_reference():
    v = torch.randn(50, generator=torch.Generator().manual_seed(1))
    codec = Codec("signtopk", 50, k=7)
    _, idx, values = codec.encode(v)
    order = sorted(range(50), key=lambda i: -abs(float(v[i])))[:7]
    scale = sum(abs(float(v[i])) for i in order) / 7
    expected = {i: (scale if v[i] >= 0 else -scale) for i in order}
    assert set(idx.tolist()) == set(order)
    for i, val in zip(idx.tolist(), values.tolist()):
        assert val == pytest.approx(expected[i], rel=1e-6)


def test_qtopk_math_against_plain_reference():
    v = torch.randn(40, generator=torch.Generator().manual_seed(2))
    k, s = 9, 4
    codec = Codec("qtopk", 40, k=k, levels=s)
    _, idx, values = codec.encode(v, torch.Generator().manual_seed(5))
    noise = torch.rand(k, generator=torch.Generator().manual_seed(5))
    kept = v[idx]
    norm = float(kept.norm())
    beta = min(k / s**2, math.sqrt(k) / s)
    for j in range(k):
        level = s * abs(float(kept[j])) / norm
        low = math.floor(level)
        xi = low + (1 if float(noise[j]) < level - low else 0)
        expected = (1 if kept[j] >= 0 else -1) * norm * xi / s / (1 + beta)
        assert float(values[j]) == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind, bits", [("int8", 8), ("2bit", 2), ("topk-int8", 8), ("topk-2bit", 2)])
def test_uniform_quantizers_round_to_the_nearest_level(kind, bits):
    v = torch.randn(200, generator=torch.Generator().manual_seed(6))
    codec = Codec(kind, 200, k=20)
    payload, idx, values = codec.encode(v)
    kept = v if idx is None else v[idx]
    if idx is not None:
        assert set(idx.tolist()) == set(torch.topk(v.abs(), 20).indices.tolist())
    m = float(kept.abs().max())
    levels = [-m + 2 * m * i / (2**bits - 1) for i in range(2**bits)]
    for x, q in zip(kept.tolist(), values.tolist()):
        nearest = min(levels, key=lambda level: abs(level - x))
        assert q == pytest.approx(nearest, abs=1e-6)
    assert payload.numel() == (4 * (idx is not None) * 20) + -(-len(kept) * bits // 8) + 4
    assert codec.paper_bits() == (200 * bits if idx is None else 20 * (bits + 8)) + 32


def test_s_level_quantizer_is_unbiased():
    # fixed seed; tolerance: 5 standard errors of the mean of 20000 draws (variance <= norm^2/(4 s^2))
    g = torch.Generator().manual_seed(3)
    v = torch.randn(64, generator=g)
    s, draws = 4, 20000
    noise = torch.rand(draws, 64, generator=g)
    mean = torch.stack([quantize(v, s, noise[i]) for i in range(draws)]).mean(0)
    bound = 5 * float(v.norm()) / (2 * s) / math.sqrt(draws)
    assert (mean - v).abs().max() < bound
    assert not torch.equal(quantize(v, s, noise[0]), v)  # it does quantize


def test_stochastic_levels_stay_in_range():
    levels = stochastic_levels(torch.tensor([0.0, 0.5, 1.0]), 8, torch.tensor([0.99, 0.0, 0.0]))
    assert levels.tolist() == [0.0, 4.0, 8.0]


@pytest.mark.parametrize("kind", KINDS)
def test_payload_size_is_fixed_and_round_trips(kind):
    codec = Codec(kind, 333, k=0.05, levels=8)
    g = torch.Generator().manual_seed(0)
    outs = [codec.encode(torch.randn(333, generator=g), torch.Generator().manual_seed(9)) for _ in range(2)]
    assert all(p.numel() == codec.nbytes for p, _, _ in outs)
    idx, values = codec.decode(torch.stack([p for p, _, _ in outs]), outs[0][1])
    for j, (_, i, v) in enumerate(outs):
        assert torch.equal(values[j], v)
        assert i is None or torch.equal(idx[j], i)


def _grbs_world(rank, world):
    model = nn.Linear(40, 30)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    dh.QsparseLocalSGD("grbs", k=0.1, period=1).register(ddp, opt)
    g = torch.Generator().manual_seed(rank)
    grads = []
    for _ in range(3):
        opt.zero_grad()
        ddp(torch.randn(8, 40, generator=g)).square().mean().backward()
        grads.append(model.weight.grad.clone())
    return grads


def test_grbs_compressor_selects_the_same_elements_on_every_rank():
    results = run_world(_grbs_world, 2)
    for step in range(3):
        a, b = results[0][step], results[1][step]
        assert torch.equal(a, b)
        assert (a != 0).sum() == math.ceil(0.1 * 1200)  # one shared selection of 10%


# ---------------------------------------------------------------- n-worker reference
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _lr(t):
    return 0.1 if t < 6 else 0.02


def _world(rank, world, steps, period, k, wipe, node_size=None):
    model = _Net()
    ddp = DDP(model, bucket_cap_mb=0.001)
    opt = torch.optim.SGD(ddp.parameters(), lr=_lr(0), momentum=0.9)
    state = dh.QsparseLocalSGD("signtopk", k=k, period=period, wipe_memory_on_lr_change=wipe, node_size=node_size)
    state.register(ddp, opt)
    for t, (x, y) in enumerate(batches(rank, steps)):
        for group in opt.param_groups:
            group["lr"] = _lr(t)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    memory = state.state_dict()["memory"]
    return params_of(model), memory, state.stats()


def _signtopk(v, k):
    out = torch.zeros_like(v)
    order = torch.tensor(sorted(range(v.numel()), key=lambda i: -abs(float(v[i])))[: min(k, v.numel())])
    scale = v[order].abs().double().sum() / order.numel()
    out[order] = torch.where(v[order] >= 0, 1.0, -1.0) * scale.float()
    return out


def _compress(v, k, shards):
    """SignTopK of each of ``shards`` row blocks of ``v`` (FSDP's dim-0 shards)."""
    return torch.cat([_signtopk(block.reshape(-1), k).view_as(block) for block in v.chunk(shards)])


def qsparse_reference(world, steps, period, k, wipe, mu=0.9, node_size=1, shards=1):
    """Qsparse-local-SGD (synchronous, SignTopK per tensor) for n simulated workers; H = 1 is
    error-compensated SignTopK SGD with momentum after aggregation. With ``node_size`` L, worker
    i is a node: its gradient is the mean of the gradients of ranks i L ... i L + L - 1.
    ``shards``: each tensor is compressed in that many row blocks (a sharded model's shards)."""
    models = [_Net() for _ in range(world)]
    moms = [[torch.zeros_like(p) for p in models[0].parameters()] for _ in range(world)]
    mem = [[torch.zeros_like(p) for p in models[0].parameters()] for _ in range(world)]
    x_last = [p.detach().clone() for p in models[0].parameters()]
    data = [batches(r, steps) for r in range(world * node_size)]
    lr_at_sync = None
    for t in range(steps):
        grads = []
        for i, m in enumerate(models):
            total = None
            for r in range(i * node_size, (i + 1) * node_size):
                m.zero_grad()
                nn.functional.cross_entropy(m(data[r][t][0]), data[r][t][1]).backward()
                total = (
                    [p.grad.clone() for p in m.parameters()]
                    if total is None
                    else [a + p.grad for a, p in zip(total, m.parameters())]
                )
            grads.append([g * (1.0 / node_size) if node_size > 1 else g for g in total])
        if period == 1:  # error-compensated compressed gradients, mean, then momentum SGD
            for kk in range(len(x_last)):
                qs = []
                for i in range(world):
                    p_i = grads[i][kk] + mem[i][kk]
                    q = _compress(p_i, k, shards)
                    mem[i][kk] = p_i - q
                    qs.append(q)
                for i in range(world):
                    grads[i][kk] = sum(qs) / world
        for i, m in enumerate(models):
            with torch.no_grad():
                for p, g, buf in zip(m.parameters(), grads[i], moms[i]):
                    buf.mul_(mu).add_(g)
                    p.sub_(_lr(t) * buf)
        if period > 1 and (t + 1) % period == 0:
            if wipe and lr_at_sync is not None and lr_at_sync != _lr(t):
                mem = [[torch.zeros_like(p) for p in x_last] for _ in range(world)]
            lr_at_sync = _lr(t)
            for kk in range(len(x_last)):
                qs = []
                for i, m in enumerate(models):
                    delta = mem[i][kk] + (x_last[kk] - list(m.parameters())[kk].detach())
                    q = _compress(delta, k, shards)
                    mem[i][kk] = delta - q
                    qs.append(q)
                x_last[kk] = x_last[kk] - sum(qs) / world
                for m in models:
                    with torch.no_grad():
                        list(m.parameters())[kk].copy_(x_last[kk])
    return [[p.detach() for p in m.parameters()] for m in models], mem


@pytest.mark.device_branches
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("period", [1, 4])
def test_agrees_with_single_process_reference(world, period):
    steps, k = 12, 10
    results = run_world(_world, world, steps, period, k, True)
    expected, _ = qsparse_reference(world, steps, period, k, True)
    for rank in range(world):
        for got, want in zip(results[rank][0], expected[rank]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if period == 1:
        assert results[0][2]["total"]["paper_ratio"] > 3


def test_memory_is_wiped_at_a_learning_rate_change():
    steps, k, period = 8, 10, 4  # syncs after steps 4 (lr 0.1) and 8 (lr 0.02: wipe first)
    wiped = run_world(_world, 2, steps, period, k, True)
    kept = run_world(_world, 2, steps, period, k, False)
    ref_wiped, mem_wiped = qsparse_reference(2, steps, period, k, True)
    ref_kept, _ = qsparse_reference(2, steps, period, k, False)
    for got, want in zip(wiped[0][0], ref_wiped[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(kept[0][0], ref_kept[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(wiped[0][0], kept[0][0]))
    # the memory after the wipe holds only the last period's residual
    saved = wiped[0][1]["memory"]
    for name, want in zip(saved, mem_wiped[0]):
        torch.testing.assert_close(saved[name].view_as(want), want, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise_value_error_naming_them():
    cases = ({"compressor": "dgc"}, {"k": 0}, {"k": 1.5}, {"period": 0}, {"levels": 300})
    msgs = value_errors(dh.QsparseLocalSGD, cases)
    assert len(msgs) == 5
    for msg, name in zip(msgs, ["compressor", "k", "k", "period", "levels"]):
        assert name in msg, msg


# ---------------------------------------------------------------- one gathered row, any offset
@pytest.mark.parametrize("kind", KINDS)
def test_decode_reads_any_row_count_at_any_byte_offset(kind):
    codec = Codec(kind, 37, k=5, levels=8)
    g = torch.Generator().manual_seed(4)
    encoded = [codec.encode(torch.randn(37, generator=g), torch.Generator().manual_seed(7)) for _ in range(3)]
    for rows in (1, 2, 3):
        for offset in range(4):  # a field's bytes may start anywhere in a gathered message
            width = offset + codec.nbytes + 3
            buffer = torch.zeros(rows, width, dtype=torch.uint8)
            for j in range(rows):
                buffer[j, offset : offset + codec.nbytes] = encoded[j][0]
            idx, values = codec.decode(buffer[:, offset : offset + codec.nbytes], encoded[0][1])
            for j in range(rows):
                assert torch.equal(values[j], encoded[j][2])
                assert idx is None or torch.equal(idx[j], encoded[j][1])


class _NetWithEmpty(_Net):
    """_Net plus a parameter of no elements (its payload is empty, at an odd offset)."""

    def __init__(self):
        super().__init__()
        self.empty = nn.Parameter(torch.zeros(0))

    def forward(self, x):
        return super().forward(x) + self.empty.sum()


def _one_row_world(rank, world, period, node_size):
    out = {}
    for kind in ["topk", "randk", "grbs", "signtopk", "qtopk", "sign", "qsgd"]:
        model = _NetWithEmpty()
        ddp = DDP(model, bucket_cap_mb=0.001)
        opt = torch.optim.SGD(ddp.parameters(), lr=_lr(0), momentum=0.9)
        state = dh.QsparseLocalSGD(kind, k=10, period=period, node_size=node_size).register(ddp, opt)
        for t, (x, y) in enumerate(batches(rank, 8)):
            for group in opt.param_groups:
                group["lr"] = _lr(t)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        out[kind] = (params_of(model), state.stats()["total"]["sent_bytes"])
    return out


@pytest.mark.parametrize("world,node_size", [(1, None), (2, 2)])
def test_one_worker_gathers_one_row(world, node_size):
    """World size 1, or one node holding every rank: each gather returns one row, for every
    compressor."""
    results = run_world(_one_row_world, world, 4, node_size)
    for kind in results[0]:
        for by_kind in results:
            params, sent = by_kind[kind]
            assert all(torch.isfinite(p).all() for p in params), kind
            assert sent > 0, kind
            for got, want in zip(params, results[0][kind][0]):
                assert torch.equal(got, want), kind
    # SignTopK against the reference: one worker of the node means (the default keeps the memory)
    expected, _ = qsparse_reference(1, 8, 4, 10, False, node_size=world)
    nonempty = [p for p in results[0]["signtopk"][0] if p.numel()]
    assert len(nonempty) == len(expected[0])
    for got, want in zip(nonempty, expected[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
