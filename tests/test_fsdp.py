"""FSDP2 / HSDP: the algorithms between the replicas of a ``fully_shard`` model, on 4 CPU ranks
(2 replicas x 2 shards, gloo). Rank r holds shard r % 2 of replica r // 2; the replicas of
shard s are ranks s and 2 + s."""

import io
import re

import pytest
import torch
from torch import nn

import ddp_hooks as dh
from ddp_hooks import catalog
from ddp_hooks.core import fsdp
from ddp_hooks.testing import run_world

OLD_TORCH = fsdp.torch_version() < fsdp.MIN_TORCH
needs_fsdp2 = pytest.mark.skipif(
    OLD_TORCH, reason=f"FSDP2's all-reduce hook needs torch 2.7, this is {torch.__version__}"
)
REPLICAS, SHARDS = 2, 2


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (REPLICAS, SHARDS), mesh_dim_names=("replicate", "shard"))


def _model(sizes=(5, 7, 3)):
    """Linear layers whose rows do not split evenly over 2 shards (FSDP pads them)."""
    torch.manual_seed(0)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _shard(model, mesh, **options):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, **options)
    return fully_shard(model, mesh=mesh, **options)


def _shard_one(module, mesh):
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module, mesh=mesh)


def _batch(step, rank, features):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, features, generator=g)


def _train(model, opt, rank, steps, first=0, micro=1):
    """``micro`` micro-batches per step, the replica exchange only at the last one."""
    features = next(model.parameters()).shape[1]
    for t in range(first, first + steps):
        for k in range(micro):
            model.set_requires_all_reduce(k == micro - 1)
            model(_batch(t * micro + k, rank, features)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.to_local().detach().clone() for p in model.parameters()]


def _baseline_world(rank, world, micro):
    mesh = _mesh()
    native = _shard(_model(), mesh)  # native HSDP: FSDP all-reduces between the replicas
    native_params = _train(native, torch.optim.SGD(native.parameters(), lr=0.1), rank, 4, micro=micro)
    ours = _shard(_model(), mesh["shard"])
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    state = dh.AllReduce().register_fsdp(ours, opt, mesh=mesh)
    our_params = _train(ours, opt, rank, 4, micro=micro)
    return native_params, our_params, state.step, state.stats()["total"]["sent_bytes"]


@needs_fsdp2
@pytest.mark.parametrize("micro", [1, 2])
def test_exact_baseline_equals_native_hsdp_to_the_last_bit(micro):
    """Padded shards, and gradient accumulation with set_requires_all_reduce(False)."""
    for rank, (native, ours, steps, sent) in enumerate(run_world(_baseline_world, 4, micro)):
        assert steps == 4, rank
        for a, b in zip(native, ours):
            assert torch.equal(a, b), (rank, (a - b).abs().max())
        # each rank sends its fp32 shard once per step: (4 + 4) + (2 + 2) or (3 + 3) + (1 + 1) rows
        assert sent == 4 * 4 * sum([(4 * 5 + 4) + (2 * 7 + 2), (3 * 5 + 3) + (1 * 7 + 1)][rank % 2 : rank % 2 + 1])


def _policy_world(rank, world, reduce_dtype, wrap):
    """Native HSDP and AllReduce through the hook, alike: bf16 parameters reduced in
    ``reduce_dtype``; ``wrap``: each block also activation-checkpointed and compiled."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
    mesh = _mesh()
    out = []
    for native in (True, False):
        model = _model((6, 10, 4))
        if wrap:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            model = nn.Sequential(*[checkpoint_wrapper(m) if isinstance(m, nn.Linear) else m for m in model])
        blocks = [m for m in model if not isinstance(m, nn.Tanh)]
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block, mesh=mesh if native else mesh["shard"], mp_policy=policy)
            if wrap:
                block.compile(backend="aot_eager")
        fully_shard(model, mesh=mesh if native else mesh["shard"], mp_policy=policy)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if not native:
            dh.AllReduce().register_fsdp(model, opt, mesh=mesh)
        out.append(_train(model, opt, rank, 3))
    return out


@needs_fsdp2
@pytest.mark.parametrize("reduce_dtype", [torch.float32, torch.bfloat16], ids=["fp32-reduce", "bf16-reduce"])
@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "checkpointed-compiled"])
def test_mixed_precision_checkpointing_and_compile_match_native_hsdp(reduce_dtype, wrap):
    """bf16 parameters: an fp32 reduce is native HSDP's to the last bit; a bf16 reduce rounds
    where native HSDP does not (the hook scales by 1/n before summing, as DDP does; FSDP
    averages), so it agrees to bf16's precision."""
    for rank, (native, ours) in enumerate(run_world(_policy_world, 4, reduce_dtype, wrap)):
        for a, b in zip(native, ours):
            if reduce_dtype == torch.float32:
                assert torch.equal(a, b), (rank, (a - b).abs().max())
            else:
                torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


class _Inputs:
    """Records each bucket's input (the replica's shard gradient) and its layout."""

    def reduce(self, bucket, step):
        index = {id(p): k for k, p in enumerate(self.model_view().params)}
        self.layouts.setdefault(step, []).append([index[id(p)] for p in bucket.params])
        for p, g in zip(bucket.params, bucket.grads()):
            self.inputs.setdefault(step, {})[index[id(p)]] = g.float().clone()
        return super().reduce(bucket, step)


def _recording(which):
    from test_powersgd import _Recording as FirstQ

    if which == "ef-sgdm":
        return type("EF", (_Inputs, dh.EFSignSGDM), {})(momentum=0.9)
    if which in ("fp16", "bf16"):
        return type(which, (_Inputs, dh.FP16Compress if which == "fp16" else dh.BF16Compress), {})()
    state = type("PowerSGD", (_Inputs, FirstQ), {})(rank=2)
    state.first_q = {}
    return state


def _reference_world(rank, world, which, sizes, steps):
    from test_ef_signsgdm import _lr

    mesh = _mesh()
    model = _shard(_model(sizes), mesh["shard"])
    opt = torch.optim.SGD(model.parameters(), lr=_lr(0))
    state = _recording(which)
    state.layouts, state.inputs = {}, {}
    state.register_fsdp(model, opt, mesh=mesh)
    outputs = []
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(t)
        model(_batch(t, rank, sizes[0])).square().mean().backward()
        outputs.append([p.grad.to_local().clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    inputs = [[state.inputs[t][k] for k in range(len(outputs[0]))] for t in range(steps)]
    shapes = {k: p.shape for k, p in enumerate(state.model_view().params)}
    # PowerSGD's Q is stored transposed, (rank, m)
    first_q = {k: q.view(min(2, shapes[k][0]), -1).T for k, q in getattr(state, "first_q", {}).items()}
    return inputs, outputs, [state.layouts[t] for t in range(steps)], first_q


def _check_replicas(results, steps, reference, **tolerance):
    """For each shard: its replicas' outputs are ``reference(replicas' inputs, first replica's
    result)``; returns the replicas of shard 0."""
    for s in range(SHARDS):
        replicas = [results[r * SHARDS + s] for r in range(REPLICAS)]
        local = [[replicas[i][0][t] for i in range(REPLICAS)] for t in range(steps)]
        expected = reference(local, replicas[0])
        for rep in replicas:
            for t in range(steps):
                for got, want in zip(rep[1][t], expected[t]):
                    torch.testing.assert_close(got.reshape(want.shape), want, **tolerance)
    return [results[r * SHARDS] for r in range(REPLICAS)]


@needs_fsdp2
def test_ef_sgdm_is_the_reference_between_the_replicas_of_each_shard():
    from test_ef_signsgdm import _lr, ef_sgdm_reference

    steps = 12
    results = run_world(_reference_world, 4, "ef-sgdm", (11, 13, 7), steps)

    def reference(local, first):
        flat = [[[g.reshape(-1) for g in grads] for grads in step] for step in local]
        return ef_sgdm_reference(flat, [_lr(t) for t in range(steps)], first[2], 0.9, True, None)

    replicas = _check_replicas(results, steps, reference, rtol=1e-5, atol=1e-6)
    mean = sum(replicas[i][0][5][0] for i in range(REPLICAS)) / REPLICAS
    assert not torch.allclose(replicas[0][1][5][0], mean, rtol=1e-2, atol=1e-3)  # compressed, not exact


@needs_fsdp2
@pytest.mark.parametrize("which", ["fp16", "bf16"])
def test_16_bit_baselines_are_the_16_bit_mean_of_the_replicas_shards(which):
    dtype = torch.float16 if which == "fp16" else torch.bfloat16
    steps = 4
    results = run_world(_reference_world, 4, which, (11, 13, 7), steps)

    def reference(local, first):
        return [[sum(g.to(dtype) / REPLICAS for g in grads).float() for grads in zip(*step)] for step in local]

    replicas = _check_replicas(results, steps, reference, rtol=0, atol=0)
    exact = sum(replicas[i][0][1][0] for i in range(REPLICAS)) / REPLICAS
    assert not torch.equal(replicas[0][1][1][0].reshape(exact.shape), exact)  # rounded, not exact


@needs_fsdp2
def test_powersgd_is_one_power_iteration_on_each_row_block():
    from test_powersgd import powersgd_reference

    steps = 5
    results = run_world(_reference_world, 4, "powersgd", (32, 24, 6), steps)
    assert results[0][3], "some row block must be compressed"
    _check_replicas(results, steps, lambda local, first: powersgd_reference(local, first[3], 2), rtol=1e-4, atol=1e-5)


class _Regularized(nn.Module):
    """test_laq's model and loss, the regularizer taken inside forward (on the unsharded
    parameters, so that its gradient goes through FSDP's reduction like the rest)."""

    def __init__(self):
        super().__init__()
        from test_laq import _model as linear

        self.linear = linear()

    def forward(self, x, y):
        reg = 0.01 * 0.5 * sum(p.square().sum() for p in self.linear.parameters())
        return nn.functional.cross_entropy(self.linear(x), y) + reg


def _laq_world(rank, world, iterations, wire):
    from test_laq import _data
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh()
    model = fully_shard(_Regularized(), mesh=mesh["shard"])  # 3 rows over 2 shards: padded
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state = dh.LAQ.paper(bits=4, wire=wire).register_fsdp(model, opt, mesh=mesh)
    x, y = _data(rank)
    for _ in range(iterations):
        model(x, y).backward()  # full local gradient (LAQ is a GD method)
        opt.step()
        opt.zero_grad()
    stats = state.stats()
    return [p.full_tensor() for p in model.parameters()], stats["uploads"]


@needs_fsdp2
@pytest.mark.parametrize("wire", ["dense", "uploads"])
def test_laq_decides_once_per_replica_for_the_whole_model(wire):
    """A replica is LAQ's worker: its gradient is the mean over its shard group, and its grid
    radius, norms and decision are the whole model's (summed over the shards)."""
    from test_laq import laq_reference

    iterations = 30
    results = run_world(_laq_world, 4, iterations, wire)
    theta, uploads = laq_reference(REPLICAS, iterations, node_size=SHARDS)
    for rank, (params, uploaded) in enumerate(results):
        torch.testing.assert_close(torch.cat([p.reshape(-1) for p in params]), theta, rtol=1e-4, atol=1e-5)
        assert uploaded == uploads[rank // SHARDS], rank
    assert sum(uploads) < 0.7 * REPLICAS * iterations  # lazy: the rule skipped rounds


def _qsparse_world(rank, world, steps, period, k):
    from test_qsparse import _lr, _Net

    from models import batches

    mesh = _mesh()
    model = _Net()
    for layer in (model.a, model.b):
        _shard_one(layer, mesh["shard"])
    _shard_one(model, mesh["shard"])
    opt = torch.optim.SGD(model.parameters(), lr=_lr(0), momentum=0.9)
    state = dh.QsparseLocalSGD("signtopk", k=k, period=period, wipe_memory_on_lr_change=True)
    state.register_fsdp(model, opt, mesh=mesh)
    for t, (x, y) in enumerate(batches(rank, steps)):
        for group in opt.param_groups:
            group["lr"] = _lr(t)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor() for p in model.parameters()]


@needs_fsdp2
@pytest.mark.parametrize("period", [1, 4])
def test_qsparse_is_the_reference_with_each_shard_compressed_apart(period):
    """A replica is a worker (its gradient the mean over its shard group); SignTopK selects
    within each shard (row block) of a tensor."""
    from test_qsparse import qsparse_reference

    steps, k = 12, 10
    results = run_world(_qsparse_world, 4, steps, period, k)
    expected, _ = qsparse_reference(REPLICAS, steps, period, k, True, node_size=SHARDS, shards=SHARDS)
    for rank, params in enumerate(results):
        for got, want in zip(params, expected[rank // SHARDS]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _through_dcp(folder, rank, saved, build, mesh):
    """Save with torch.distributed.checkpoint (model and optimizer) and the hook state per rank
    beside it, as a torchtitan-style script does; load into a fresh build. The local-step
    algorithms keep a model per replica between synchronizations: each replica saves its own
    (DCP sees a shard of the 1-D shard mesh on both replicas and would keep one of them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt, state = saved
    if state.keeps_local_models:
        folder, group = f"{folder}/replica{mesh['replicate'].get_local_rank()}", mesh["shard"].get_group()
    else:
        group = None
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder, process_group=group)
    torch.save(state.state_dict(), f"{folder}/hook_rank{rank}.pt")
    model, opt, state = build()
    model_sd, optim_sd = get_state_dict(model, opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=folder, process_group=group)
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    state.load_state_dict(torch.load(f"{folder}/hook_rank{rank}.pt", weights_only=False))
    return model, opt, state


def _resume_world(rank, world, name, folder=None):
    mesh = _mesh()
    entry = catalog.ENTRIES[name]

    def build():
        model = _shard(_model((9, 12, 4)), mesh["shard"])
        opt = entry.optimizer(model.parameters(), 0.05 * entry.lr_scale)
        return model, opt, entry.state().register_fsdp(model, opt, mesh=mesh)

    model, opt, _ = build()
    straight = _train(model, opt, rank, 8)
    model, opt, state = build()
    _train(model, opt, rank, 4)
    if folder is not None:
        model, opt, state = _through_dcp(folder, rank, (model, opt, state), build, mesh)
    else:
        buffer = io.BytesIO()  # what torch.save writes and torch.load reads back
        torch.save({"hook": state.state_dict(), "opt": opt.state_dict(), "model": model.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=False)
        model, opt, state = build()
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state.load_state_dict(saved["hook"])
    resumed = _train(model, opt, rank, 4, first=4)
    return straight, resumed, state.step


@needs_fsdp2
@pytest.mark.parametrize("name", ["ef-sgdm", "laq", "qsparse", "cser"])
def test_resume_through_distributed_checkpoint_is_bit_exact(name, tmp_path):
    for rank, (straight, resumed, step) in enumerate(run_world(_resume_world, 4, name, str(tmp_path))):
        assert step == 8
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b), (name, rank, (a - b).abs().max())


@needs_fsdp2
@pytest.mark.parametrize("name", list(catalog.ENTRIES))
def test_every_hook_trains_and_resumes_bit_exactly(name):
    results = run_world(_resume_world, 4, name)
    for rank, (straight, resumed, step) in enumerate(results):
        assert step == 8
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b), (name, rank, (a - b).abs().max())
    for s in range(SHARDS):  # the replicas of a shard hold the same values
        for a, b in zip(results[s][0], results[SHARDS + s][0]):
            assert torch.equal(a, b), (name, s)


def _other_shard_world(rank, world):
    import torch.distributed as dist

    mesh = _mesh()
    model = _shard(_model((6, 8, 4)), mesh["shard"])  # shards of the same shapes on both ranks
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = dh.EFSignSGDM(momentum=0.9).register_fsdp(model, opt, mesh=mesh)
    _train(model, opt, rank, 2)
    saved = [None] * world
    dist.all_gather_object(saved, state.state_dict())
    with pytest.raises(ValueError) as raised:
        state.load_state_dict(saved[rank ^ 1])  # the same replica's other shard
    return str(raised.value)


@needs_fsdp2
def test_a_checkpoint_of_another_shard_is_refused_naming_it():
    for error in run_world(_other_shard_world, 4):
        assert "shard" in error and "rank:" not in error, error  # the same replica index, another shard


def _nonfinite_world(rank, world, name):
    mesh = _mesh()
    model = _shard(_model(), mesh["shard"])
    entry = catalog.ENTRIES[name]
    opt = entry.optimizer(model.parameters(), 0.05)
    entry.state().register_fsdp(model, opt, mesh=mesh)
    weight = torch.ones(3)
    if rank == 1:
        weight[0] = float("nan")  # output row 0: the last layer's shard 0 only, on rank 1 only
    (model(_batch(0, rank, 5)) * weight).sum().backward()
    return [bool(torch.isfinite(p.grad.to_local()).all()) for p in model.parameters()]


@needs_fsdp2
@pytest.mark.parametrize("name", ["fp32", "ef-sgdm"])
def test_a_non_finite_shard_on_one_rank_is_non_finite_on_every_rank(name):
    results = run_world(_nonfinite_world, 4, name)
    assert results[0] == results[1] == results[2] == results[3], results
    assert not any(results[0]), results


def _fault_world(rank, world, name, stall_s=0.0):
    """Rank 1 dies (or, with ``stall_s``, stays silent that long, then dies) inside its hook at
    step 3; every survivor must raise."""
    import os
    import time

    mesh = _mesh()
    model = _shard(_model((6, 10, 4)), mesh["shard"])
    entry = catalog.ENTRIES[name]
    opt = entry.optimizer(model.parameters(), 0.05 * entry.lr_scale)
    state = entry.state().register_fsdp(model, opt, mesh=mesh)
    if rank == 1:
        reduce = state.reduce

        def failing(bucket, step):
            if step == 3:
                time.sleep(stall_s)
                os._exit(7)
            return reduce(bucket, step)

        state.reduce = failing
    for t in range(8):
        start = time.monotonic()
        try:
            model(_batch(t, rank, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        except Exception as exc:  # noqa: BLE001 - what the survivor saw is the result
            return {"failed_at": t, "seconds": time.monotonic() - start, "error": f"{type(exc).__name__}: {exc}"}
    return {"failed_at": None}


@needs_fsdp2
@pytest.mark.parametrize("name", list(catalog.ENTRIES))
def test_a_dead_peer_fails_every_survivor(name):
    results = run_world(_fault_world, 4, name, may_die=(1,), timeout=120)
    for rank, r in enumerate(results):
        if rank != 1:
            assert r["failed_at"] in (3, 4), (rank, r)  # the step of the failure, or the next one
            assert r["seconds"] < 30, (rank, r)


@needs_fsdp2
@pytest.mark.parametrize("name", ["fp32", "ef-sgdm", "laq"])
def test_a_stalled_peer_fails_its_replica_at_the_process_group_timeout(name):
    """The rank that exchanges with the stalled one between replicas (rank 3) fails at the
    timeout given to init_process_group; the others wait on FSDP's own groups (the device mesh's
    timeout) and fail when the stalled rank finally exits."""
    timeout_s = 2
    stall_s = 4 * timeout_s
    results = run_world(_fault_world, 4, name, stall_s, may_die=(1,), timeout=120, group_timeout=timeout_s)
    partner = results[3]
    assert partner["failed_at"] == 3 and 0.8 * timeout_s <= partner["seconds"] < stall_s, partner
    for rank in (0, 2):
        assert results[rank]["failed_at"] in (3, 4), (rank, results[rank])


def _mismatch_world(rank, world):
    mesh = _mesh()
    model = _shard(_model(), mesh["shard"])
    with pytest.raises(dh.ConfigMismatch) as raised:  # rank 3 differs: its shard group and its replica's
        dh.EFSignSGDM(momentum=0.8 if rank == 3 else 0.9).register_fsdp(model, mesh=mesh)
    return str(raised.value)


@needs_fsdp2
def test_every_rank_refuses_a_configuration_that_differs_anywhere():
    for error in run_world(_mismatch_world, 4):
        assert "momentum" in error, error


def _refusal_world(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = _mesh()
    errors = []

    def refused(make_state, model, mesh_arg):
        with pytest.raises(ValueError) as raised:
            make_state().register_fsdp(model, mesh=mesh_arg)
        errors.append(str(raised.value))

    flat_mesh = init_device_mesh("cpu", (world,))
    refused(dh.AllReduce, _shard(_model(), mesh["shard"]), flat_mesh)  # a 1-D mesh over all ranks
    refused(dh.AllReduce, _shard(_model(), mesh), mesh)  # sharded with the 2-D mesh: native HSDP
    refused(dh.AllReduce, _model(), mesh)  # not sharded
    refused(lambda: dh.AllReduce(node_size=2), _shard(_model(), mesh["shard"]), mesh)
    refused(dh.AllReduce, _shard(_model(), mesh["shard"]), "mesh")
    return errors


@needs_fsdp2
def test_bad_input_is_refused_at_registration_naming_it():
    errors = run_world(_refusal_world, 4)[0]
    for error, words in zip(errors, ["1-D mesh", "native HSDP", "fully_shard", "node_size", "DeviceMesh"]):
        assert words in error, (words, error)


@pytest.mark.skipif(not OLD_TORCH, reason="this torch has FSDP2's all-reduce hook")
def test_older_torch_is_refused_naming_the_version():
    with pytest.raises(ValueError, match=f"torch 2.7 or later.*{re.escape(torch.__version__)}"):
        dh.AllReduce().register_fsdp(nn.Linear(2, 2), mesh=None)
