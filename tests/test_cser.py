"""CSER: GRBS masks, synchronous-SGD special case, resets, a plain n-worker reference, the RC
formula, averaged models, the ratio helper and argument checks."""

import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_hooks as dh
from ddp_hooks.compress import grbs
from ddp_hooks.testing import run_world

from models import batches, params_of, value_errors


# ---------------------------------------------------------------- GRBS
def _mask_world(rank, world):
    g = torch.Generator().manual_seed(7)
    draws = [grbs.select(1000, 16, 8.0, g) for _ in range(5)]
    torch.manual_seed(rank)  # the global RNG differs per rank and must not matter
    torch.rand(3)
    return draws


def test_grbs_masks_identical_on_all_ranks_and_different_across_steps():
    results = run_world(_mask_world, 4)
    for draws in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], draws))
    draws = results[0]
    assert all(not torch.equal(a, b) for a, b in zip(draws, draws[1:]))
    for idx in draws:  # ceil(63 / 8) = 8 blocks of 16 (the last block, 1000 = 62*16 + 8, is short)
        assert idx.numel() in (8 * 16, 7 * 16 + 8)
        assert torch.equal(idx, idx.unique())
        assert torch.equal((idx // 16).unique().numel() * torch.ones(1), torch.tensor([8.0]))


def test_grbs_gather_scatter_round_trip():
    x = torch.randn(103)
    idx = grbs.select(103, 10, 3.0, torch.Generator().manual_seed(0))
    y = torch.zeros(103)
    grbs.scatter(y, idx, grbs.gather(x, idx))
    assert torch.equal(y[idx], x[idx]) and (y != 0).sum() == idx.numel()


# ---------------------------------------------------------------- a small model
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 5)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _train_world(rank, world, config, steps, cap=25):
    model = _Net()
    ddp = DDP(model, bucket_cap_mb=cap)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    state = dh.CSER(**config).register(ddp, opt) if config is not None else None
    out = []
    for x, y in batches(rank, steps):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        out.append(params_of(model))
    stats = state.stats() if state is not None else None
    return out, stats


def test_no_compression_equals_synchronous_sgd_exactly():
    plain = run_world(_train_world, 2, None, 8)
    cser = run_world(_train_world, 2, {"grad_ratio": 1, "model_ratio": 1, "period": 3, "block_size": 8}, 8)
    for rank in range(2):
        for a, b in zip(plain[rank][0][-1], cser[rank][0][-1]):
            assert torch.equal(a, b)


def test_no_compression_equals_synchronous_sgd_on_four_ranks():
    # on 4 ranks the gloo sum order depends on the payload length: fp32 tolerance
    plain = run_world(_train_world, 4, None, 6)
    cser = run_world(_train_world, 4, {"grad_ratio": 1, "model_ratio": 1, "period": 2, "block_size": 8}, 6)
    for a, b in zip(plain[3][0][-1], cser[3][0][-1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("world", [2, 4])
def test_reset_with_identity_model_compressor_makes_local_models_equal(world):
    results = run_world(_train_world, world, {"grad_ratio": 8, "model_ratio": 1, "period": 3, "block_size": 8}, 7)
    for step in range(7):
        same = all(all(torch.equal(a, b) for a, b in zip(results[0][0][step], r[0][step])) for r in results[1:])
        assert same == ((step + 1) % 3 == 0), step  # equal right after each reset, apart between


def test_bytes_per_step_match_the_rc_formula():
    config = {"grad_ratio": 16, "model_ratio": 4, "period": 8, "block_size": 4}
    results = run_world(_train_world, 2, config, 64)
    total = results[0][1]["total"]
    expected = dh.cser_ratio(16, 4, 8)  # 1 / (1/32 + 1/16) = 10.67
    assert expected == pytest.approx(32 / 3)
    # the GRBS draws are whole blocks and one flag element travels per bucket: within 3%
    assert total["ratio"] == pytest.approx(expected, rel=0.03)
    assert total["paper_ratio"] == pytest.approx(expected, rel=0.03)


# ---------------------------------------------------------------- the plain reference
class _Recording(dh.CSER):
    """Records the elements the hook and the resets selected."""

    def selection(self, params, step):
        idx = super().selection(params, step)
        index = {id(p): k for k, p in enumerate(self.model_view().params)}
        self.log.append(("grad", step, [index[id(p)] for p in params], idx))
        return idx

    def synchronize(self, step):
        state = self.rng.shared.get_state()
        total = sum(p.numel() for p in self.model_view().params)
        self.log.append(
            (
                "reset",
                step,
                None,
                grbs.select(total, self.settings.block_size, self.settings.model_ratio, self.rng.shared),
            )
        )
        self.rng.shared.set_state(state)
        super().synchronize(step)


def _reference_world(rank, world, steps, config):
    model = _Net()
    ddp = DDP(model, bucket_cap_mb=0.002)
    state = _Recording(**config)
    state.log = []
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    state.register(ddp, opt)
    for x, y in batches(rank, steps):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return params_of(model), state.log


def cser_reference(world, steps, log, lr=0.1, mu=0.9, node_size=1):
    """CSER for n simulated workers, written plainly with flat parameter vectors. With
    ``node_size`` L, worker i is a node: its gradient is the mean of ranks i L ... i L + L - 1's.
    A logged event with no members gives its positions in the flat model already; several
    resets may follow one step (a sharded model: one per shard)."""
    models = [_Net() for _ in range(world)]
    shapes = [p.shape for p in models[0].parameters()]
    numels = [s.numel() for s in shapes]
    offsets = [sum(numels[:k]) for k in range(len(numels))]
    x = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models]
    agreed = x[0].clone()
    momentum = [torch.zeros_like(x[0]) for _ in range(world)]
    data = [batches(r, steps) for r in range(world * node_size)]
    events = iter(log)
    for t in range(steps):
        grads = []
        for i, m in enumerate(models):
            with torch.no_grad():
                for p, piece in zip(m.parameters(), x[i].split(numels)):
                    p.copy_(piece.view_as(p))
            total = None
            for r in range(i * node_size, (i + 1) * node_size):
                m.zero_grad()
                nn.functional.cross_entropy(m(data[r][t][0]), data[r][t][1]).backward()
                g = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
                total = g if total is None else total + g
            grads.append(total * (1.0 / node_size) if node_size > 1 else total)
        # partial gradient sync, bucket by bucket
        synced = [g.clone() for g in grads]
        event = next(events)
        while event[0] == "grad" and event[1] == t:
            members, idx = event[2], event[3]
            if members is None:
                pos = idx
            else:
                flat_pos = torch.cat([torch.arange(offsets[k], offsets[k] + numels[k]) for k in members])
                pos = flat_pos[idx]
            mean = sum(g[pos] for g in grads) / world
            for s in synced:
                s[pos] = mean
            event = next(events, ("end", None, None, None))
        # local SGD with momentum
        for i in range(world):
            momentum[i] = mu * momentum[i] + synced[i]
            x[i] = x[i] - lr * momentum[i]
        while event[0] == "reset":
            idx = event[3]
            c = [xi[idx] - agreed[idx] for xi in x]
            c_mean = sum(c) / world
            agreed[idx] += c_mean
            for i in range(world):
                x[i][idx] = x[i][idx] - c[i] + c_mean
            event = next(events, ("end", None, None, None))
        if event[0] != "end":
            events = iter([event, *events])
    return x


@pytest.mark.device_branches
@pytest.mark.parametrize("world", [2, 4])
def test_hook_and_resets_agree_with_single_process_reference(world):
    steps = 10
    config = {"grad_ratio": 4, "model_ratio": 2, "period": 3, "block_size": 8}
    results = run_world(_reference_world, world, steps, config)
    expected = cser_reference(world, steps, results[0][1])
    for rank in range(world):
        got = torch.cat([p.reshape(-1) for p in results[rank][0]])
        torch.testing.assert_close(got, expected[rank], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[0], expected[1])  # local models really bifurcate


# ---------------------------------------------------------------- averaged models
def _averaged_world(rank, world):
    model = _Net()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    state = dh.CSER(grad_ratio=8, model_ratio=4, period=100).register(ddp, opt)
    for x, y in batches(rank, 3):
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    local = params_of(model)
    with state.averaged():
        inside = params_of(model)
    return local, inside, params_of(model)


def test_averaged_models_for_evaluation_then_restored():
    results = run_world(_averaged_world, 2)
    for local, _, after in results:
        assert all(torch.equal(a, b) for a, b in zip(local, after))
    for k in range(len(results[0][0])):
        mean = (results[0][0][k] + results[1][0][k]) / 2
        torch.testing.assert_close(results[0][1][k], mean)
        assert torch.equal(results[0][1][k], results[1][1][k])


# ---------------------------------------------------------------- helper and arguments
def test_ratio_helper_and_proposals():
    assert dh.cser_ratio(64, 4, 16) == 32
    assert dh.cser_ratio(None, 8, 4) == 32
    for target in (32, 256, 1024):
        configs = dh.cser_configs(target)
        assert {c["variant"] for c in configs} == {"CSER", "CSEA", "CSER-PL"}
        for c in configs:
            assert dh.cser_ratio(c["grad_ratio"], c["model_ratio"], c["period"]) == pytest.approx(target)


def test_csea_and_partial_local_sgd_constructors():
    csea = dh.CSER.csea(32)
    pl = dh.CSER.partial_local_sgd(8, 4)
    assert (csea.settings.grad_ratio, csea.settings.period, csea.ratio) == (None, 1, 32.0)
    assert (pl.settings.grad_ratio, pl.settings.period, pl.ratio) == (None, 4, 32.0)


def test_bad_arguments_raise_value_error_naming_them():
    msgs = value_errors(dh.CSER, ({"grad_ratio": 0.5}, {"model_ratio": 0}, {"period": 0}, {"block_size": 0}))
    assert len(msgs) == 4
    for msg, name in zip(msgs, ["grad_ratio", "model_ratio", "period", "block_size"]):
        assert name in msg, msg


# ---------------------------------------------------------------- resets with other compressors
def _codec_world(rank, world, steps, compressor, model_ratio, period):
    config = {"grad_ratio": None, "model_ratio": model_ratio, "period": period, "model_compressor": compressor}
    return _train_world(rank, world, config, steps)[0]


def _topk_message(v, k):
    out = torch.zeros_like(v)
    order = torch.tensor(sorted(range(v.numel()), key=lambda i: -abs(float(v[i])))[:k])
    out[order] = v[order]
    return out


def test_reset_with_topk_tracks_the_residual_explicitly():
    world, steps, ratio, period = 2, 6, 4.0, 2
    results = run_world(_codec_world, world, steps, "topk", ratio, period)
    # the reference: local momentum SGD, and every `period` steps c_i = TopK(x_i - x^) per tensor
    models = [_Net() for _ in range(world)]
    agreed = [p.detach().clone() for p in models[0].parameters()]
    moms = [[torch.zeros_like(p) for p in agreed] for _ in range(world)]
    data = [batches(i, steps) for i in range(world)]
    for t in range(steps):
        for i, m in enumerate(models):
            m.zero_grad()
            nn.functional.cross_entropy(m(data[i][t][0]), data[i][t][1]).backward()
            with torch.no_grad():
                for p, buf in zip(m.parameters(), moms[i]):
                    buf.mul_(0.9).add_(p.grad)
                    p.sub_(0.1 * buf)
        if (t + 1) % period == 0:
            for kk, a in enumerate(agreed):
                ps = [list(m.parameters())[kk] for m in models]
                k = math.ceil(a.numel() / ratio)
                cs = [_topk_message((p.detach() - a).reshape(-1), k).view_as(a) for p in ps]
                mean = sum(cs) / world
                with torch.no_grad():
                    for p, c in zip(ps, cs):
                        p.add_(mean - c)
                a.add_(mean)
        for i in range(world):
            for got, want in zip(results[i][t], models[i].parameters()):
                torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


def test_reset_with_full_topk_makes_models_equal():
    results = run_world(_codec_world, 2, 4, "topk", 1.0, 2)
    for step in (1, 3):
        for a, b in zip(results[0][step], results[1][step]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not all(torch.allclose(a, b) for a, b in zip(results[0][0], results[1][0]))
