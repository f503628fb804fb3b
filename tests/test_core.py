"""Foundation: warm-up, memory across bucket rebuilds, checkpoints, argument checks."""

import copy

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_hooks as dh
from ddp_hooks.core import HookState
from ddp_hooks.testing import run_world

from models import Reordered, batches, params_of, train_steps, value_errors


# ---------------------------------------------------------------- warm-up is exact DDP
def _warmup_world(rank, world, hook, warmup, steps):
    torch.manual_seed(0)
    model = Reordered()
    ddp = DDP(model, bucket_cap_mb=0.002)
    if hook == "fp16":
        dh.FP16Compress(warmup_steps=warmup).register(ddp)
    elif hook == "exact":
        dh.AllReduce().register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    out = []
    for x, y in batches(rank, steps):
        train_steps(ddp, opt, [(x, y)])
        out.append(params_of(model))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_warmup_steps_are_bit_identical_to_ddp_without_hook(world):
    plain = run_world(_warmup_world, world, None, 0, 4)
    fp16 = run_world(_warmup_world, world, "fp16", 3, 4)
    for rank in range(world):
        for step in range(3):
            assert all(torch.equal(a, b) for a, b in zip(plain[rank][step], fp16[rank][step]))
        # the fourth step is compressed: fp16 rounding must show, or the test proves nothing
        assert not all(torch.equal(a, b) for a, b in zip(plain[rank][3], fp16[rank][3]))


def test_exact_baseline_is_bit_identical_to_ddp_without_hook():
    plain = run_world(_warmup_world, 2, None, 0, 3)
    exact = run_world(_warmup_world, 2, "exact", 0, 3)
    for a, b in zip(plain[1][-1], exact[1][-1]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- memory across bucket rebuild
class _Probe(HookState):
    """Writes a known value per parameter into memory at step 0, reads it back later."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.layouts = {}
        self.seen = {}

    def reduce(self, bucket, step):
        params = bucket.params
        names = self.model_view().names
        self.layouts.setdefault(step, []).append([names[id(p)] for p in params])
        flat = self.memory.flat("probe", params)
        if step == 0:
            for p, piece in zip(params, flat.split([q.numel() for q in params])):
                piece.copy_(_known(names[id(p)], p.numel()))
        else:
            for p, piece in zip(params, flat.split([q.numel() for q in params])):
                self.seen.setdefault(step, {})[names[id(p)]] = piece.clone()
        return self.exact_mean(bucket.buffer, step)


def _known(name, numel):
    return torch.arange(numel, dtype=torch.float32) + 1000.0 * (sum(map(ord, name)) % 97)


def _rebuild_world(rank, world):
    torch.manual_seed(0)
    model = Reordered(width=64)
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = _Probe().register(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    train_steps(ddp, opt, batches(rank, 4))
    return state.layouts[0], state.layouts[3], state.seen[3]


@pytest.mark.parametrize("world", [2, 4])
def test_memory_survives_bucket_rebuild(world):
    for first, later, seen in run_world(_rebuild_world, world):
        assert first != later, "the bucket layout must change after the rebuild"
        assert sorted(sum(first, [])) == sorted(sum(later, [])) == sorted(seen)
        for name, value in seen.items():
            assert torch.equal(value, _known(name, value.numel())), name


def test_memory_flat_views_share_storage_and_relayout():
    mem = dh.core.ParameterMemory()
    a, b, c = (
        torch.nn.Parameter(torch.zeros(3)),
        torch.nn.Parameter(torch.zeros(2, 2)),
        torch.nn.Parameter(torch.zeros(1)),
    )
    flat = mem.flat("e", [a, b])
    flat.copy_(torch.arange(7.0))
    assert torch.equal(mem.get("e", b).view(-1), torch.tensor([3.0, 4, 5, 6]))
    again = mem.flat("e", [c, b, a])  # new layout: assembled from the pieces
    assert torch.equal(again, torch.tensor([0.0, 3, 4, 5, 6, 0, 1, 2]))
    again[1] = 42.0
    assert mem.get("e", b).view(-1)[0] == 42.0
    assert mem.flat("e", [c, b, a]) is again


# ---------------------------------------------------------------- checkpoints
class _ToyEF(HookState):
    """fp16 rounding with error feedback: state that must survive a checkpoint exactly."""

    memory_slots = ("error",)

    def reduce(self, bucket, step):
        buf = bucket.buffer
        err = self.memory.flat("error", bucket.params)
        p = buf + err
        q = p.half().float()
        err.copy_(p - q)
        buf.copy_(q).mul_(1.0 / self.world_size)
        return self.transport.all_reduce(buf, step)


def _checkpoint_world(rank, world, split, total):
    torch.manual_seed(0)
    data = batches(rank, total)
    model = Reordered()
    ddp = DDP(model, bucket_cap_mb=0.002)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    state = _ToyEF().register(ddp)
    train_steps(ddp, opt, data[:split])
    saved = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "opt": copy.deepcopy(opt.state_dict()),
        "hook": state.state_dict(),
    }
    train_steps(ddp, opt, data[split:])
    straight = params_of(model)

    # a restart: a fresh model, optimizer and state, loaded from the checkpoint
    torch.manual_seed(123)
    model2 = Reordered()
    model2.load_state_dict(saved["model"])
    ddp2 = DDP(model2, bucket_cap_mb=0.002)
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    state2 = _ToyEF().register(ddp2)
    state2.load_state_dict(saved["hook"])
    assert state2.step == split
    train_steps(ddp2, opt2, data[split:])
    return straight, params_of(model2), saved["hook"]


def _load_elsewhere(rank, world, saved, other_model):
    model = Reordered(width=48) if other_model else Reordered()
    ddp = DDP(model)
    state = _ToyEF().register(ddp)
    try:
        state.load_state_dict(saved)
    except ValueError as exc:
        return str(exc)
    return None


def test_state_dict_round_trip_resumes_exactly_and_validates():
    results = run_world(_checkpoint_world, 2, 3, 6)
    for straight, resumed, saved in results:
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
        assert saved["memory"]["error"], "the error memory must be in the checkpoint"
        assert any(t.abs().sum() > 0 for t in saved["memory"]["error"].values())
    saved0 = results[0][2]
    msgs = run_world(_load_elsewhere, 4, saved0, False)
    assert "world size: saved 2, now 4" in msgs[0]
    msgs = run_world(_load_elsewhere, 2, saved0, True)
    assert "shape of" in msgs[0] and "blocks.0.weight" in msgs[0]
    assert "rank: saved 0, now 1" in msgs[1]


# ---------------------------------------------------------------- argument checks
def test_bad_constructor_arguments_raise_value_error_naming_them():
    msgs = value_errors(dh.AllReduce, ({"warmup_steps": -1}, {"warmup_steps": 1.5}))
    assert len(msgs) == 2
    assert all("warmup_steps" in m and "integer in [0, " in m for m in msgs)

    # every algorithm takes the runtime options by keyword, checked in one place
    for algorithm in (dh.EFSignSGDM, dh.CSER, dh.QsparseLocalSGD, dh.PowerSGD):
        msgs = value_errors(algorithm, ({"warmup_steps": -1}, {"node_size": 0}))
        assert "warmup_steps" in msgs[0] and "node_size" in msgs[1], (algorithm, msgs)
    assert "LAQ takes no warmup_steps" in value_errors(dh.LAQ, ({"warmup_steps": 2},))[0]


def test_state_is_built_before_the_process_group_and_binds_at_first_use():
    state = dh.PowerSGD(rank=2, warmup_steps=3)  # no process group yet: fine
    with pytest.raises(RuntimeError, match="init_process_group"):
        _ = state.world_size


def _branch_world(rank, world):
    from ddp_hooks.core import may_read_host

    return may_read_host(torch.device("cpu"))


def test_the_sync_free_switch_reaches_every_rank(monkeypatch):
    assert run_world(_branch_world, 2) == [True, True]
    monkeypatch.setenv("DDP_HOOKS_SYNC_FREE", "1")
    assert run_world(_branch_world, 2) == [False, False]


# ---------------------------------------------------------------- the flag at a message's tail
@pytest.mark.parametrize("bad_ranks", [(), (1,), (0, 2)])
def test_flag_tail_survives_a_sum_and_a_gather(bad_ranks):
    """A summed message keeps its values and says whether any rank's flag was set; so do
    gathered byte rows (and one summed byte row), whatever their alignment."""
    from ddp_hooks.compress.bits import FLAG_BYTES, ByteLayout
    from ddp_hooks.core import split_flag, with_flag, write_flag

    values = [torch.arange(5, dtype=torch.float32) * (r + 1) for r in range(3)]
    flags = [torch.tensor(r in bad_ranks) for r in range(3)]
    summed, bad = split_flag(sum(with_flag(v, f) for v, f in zip(values, flags)))
    assert torch.equal(summed, sum(values)) and bool(bad) == bool(bad_ranks)
    # a message of several parts, and a preallocated one whose last slot takes the flag
    parts = [with_flag([v[:2], v[2:]], f) for v, f in zip(values, flags)]
    assert all(torch.equal(p, with_flag(v, f)) for p, v, f in zip(parts, values, flags))
    written = [write_flag(torch.cat([v, torch.full((1,), 7.0)]), f) for v, f in zip(values, flags)]
    assert all(torch.equal(w, p) for w, p in zip(written, parts))
    assert bool(split_flag(sum(written))[1]) == bool(bad_ranks)
    assert with_flag(values[0].double(), flags[0]).dtype == torch.float64
    # a flag that traveled in a non-finite scaled payload is NaN: it counts as set
    assert bool(split_flag(torch.tensor([1.0, float("nan")]))[1])
    payloads = [torch.full((3,), r, dtype=torch.uint8) for r in range(3)]
    layout = ByteLayout([3], flag=True)
    rows = torch.stack([layout.join([p], f) for p, f in zip(payloads, flags)])
    assert rows.shape[1] == 3 + FLAG_BYTES
    assert bool(layout.any_flag(rows)) == bool(bad_ranks)
    assert bool(layout.any_flag(rows[2])) == (2 in bad_ranks)  # one row, at an unaligned offset


def test_byte_layout_lays_fields_end_to_end_with_the_flag_last():
    """The one builder of byte messages: fields at their spans in any row (one message or
    gathered rows), read as bytes or as another dtype, the flag at the tail."""
    from ddp_hooks.compress.bits import FLAG_BYTES, ByteLayout

    layout = ByteLayout({"signs": 3, "scales": 8}, flag=True)
    assert layout.spans == {"signs": (0, 3), "scales": (3, 11)} and layout.nbytes == 11 + FLAG_BYTES
    scales = torch.tensor([1.5, -2.0])
    rows = torch.stack(
        [
            layout.join({"signs": torch.full((3,), r, dtype=torch.uint8), "scales": scales * r}, torch.tensor(r == 2))
            for r in range(3)
        ]
    )
    assert torch.equal(layout.field(rows, "signs")[:, 0], torch.arange(3, dtype=torch.uint8))
    assert torch.equal(layout.field(rows, "scales", torch.float32), torch.stack([scales * r for r in range(3)]))
    assert torch.equal(layout.field(rows[1], "scales", torch.float32), scales)  # one row, unaligned
    assert bool(layout.any_flag(rows)) and not bool(layout.any_flag(rows[:2]))
    assert not bool(layout.any_flag(layout.set_flag(rows, torch.tensor(False))))
    plain = ByteLayout([2, 4])  # fields by position, no flag
    assert plain.nbytes == 6 and plain.field(torch.arange(6, dtype=torch.uint8), 1).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("kind", ["topk", "signtopk", "qsgd", "int8", "topk-2bit", "none"])
def test_error_feedback_keeps_what_the_message_left_out(kind):
    """v = x + rho e, q = C(v), e = v - q: after an error-compensated encode, the decoded
    message plus the new memory is the compensated input (to float rounding)."""
    from ddp_hooks.compress.error_feedback import compensate, residual
    from ddp_hooks.compress.sparse import Codec

    gen = torch.Generator().manual_seed(3)
    x, e = torch.randn(300, generator=gen), torch.randn(300, generator=gen)
    rho = torch.rand(300, generator=gen)
    torch.testing.assert_close(compensate(x.clone(), e, rho), x + e * rho)
    out = torch.empty(300)
    assert compensate(x, e, 0.5, out=out) is out and torch.equal(out, x + 0.5 * e)
    idx = torch.tensor([4, 1, 7])
    kept = residual(x.clone(), x[idx], idx)
    assert torch.all(kept[idx] == 0) and torch.equal(kept[8:], x[8:])

    codec = Codec(kind, 300, k=30)
    memory = e.clone()
    payload, _, _ = codec.encode_ef(x.clone(), memory, torch.Generator().manual_seed(0))
    q_idx, q_values = codec.decode(payload.view(1, -1))
    q = torch.zeros(300)
    if q_idx is None:
        q += q_values[0]
    else:
        q.index_add_(0, q_idx[0], q_values[0])
    torch.testing.assert_close(q + memory, x + e, rtol=1e-6, atol=1e-5)
    assert 0 < (memory != 0).sum() or kind == "none"
