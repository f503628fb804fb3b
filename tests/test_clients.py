"""The training loops users already have, for real: Lightning's DDPStrategy with HookCallback,
Accelerate after ``prepare`` (launched by ``accelerate launch``), and a plain torchrun script.
Each runs 2 CPU ranks in its own processes and reports per rank through JSON files."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLIENTS = Path(__file__).resolve().parent / "clients"
from ddp_hooks.catalog import ENTRIES  # noqa: E402

HOOKS = ["fp16", "ef-sgdm", "powersgd", "cser", "qsparse", "laq"]
REPLICATED = {"fp16", "ef-sgdm", "powersgd", "laq"}  # one model on every rank after every step


def _env():
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(CLIENTS), env.get("PYTHONPATH", "")])
    return env


def _launch(command, out: Path, timeout=300):
    done = subprocess.run(command, cwd=CLIENTS, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _torchrun(script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, *args]


# ---------------------------------------------------------------- plain torchrun
@pytest.mark.parametrize("hook", ["ef-sgdm", "cser"])
def test_torchrun_script_with_the_one_line(hook, tmp_path):
    ranks = _launch(_torchrun("torchrun_run.py", "--hook", hook, "--out", str(tmp_path)), tmp_path)
    for r, result in enumerate(ranks):
        assert result["local_rank"] == r and result["world"] == 2 and result["steps"] == 150
        assert result["accuracy"] > 0.9
        assert result["ratio"] > 10


# ---------------------------------------------------------------- Lightning
@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")
def test_lightning_ddp_strategy_with_hook_callback(tmp_path):
    ranks = _launch(_torchrun("lightning_run.py", "--hooks", ",".join(HOOKS), "--out", str(tmp_path)), tmp_path)
    for hook in HOOKS:
        for result in (ranks[0][hook], ranks[1][hook]):
            assert result["steps"] == 120, (hook, "the hook runs on CPU too, once per step")
            assert result["ratio"] > 1.5, (hook, "fewer bytes than an fp32 all-reduce")
            assert result["accuracy"] > 0.85 and result["accuracy_resumed"] > 0.85, (hook, result)
            assert result["restored_equal"], (hook, "the checkpoint gives every rank its own state back")
            assert result["steps_after_resume"] == 240, hook
        if hook in REPLICATED:
            assert ranks[0][hook]["params"] == ranks[1][hook]["params"], hook


# ---------------------------------------------------------------- Accelerate
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")
def test_accelerate_after_prepare_with_gradient_accumulation(tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    command = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "accelerate_run.py",
        "--hooks",
        ",".join(HOOKS),
        "--accumulate",
        "2",
        "--out",
        str(tmp_path),
    ]
    ranks = _launch(command, tmp_path)
    for hook in HOOKS:
        for result in (ranks[0][hook], ranks[1][hook]):
            assert result["distributed_type"].endswith("MULTI_CPU"), hook
            # accumulation: the hook runs only on the steps that synchronize (no_sync in between)
            assert result["backwards"] == 150 and 75 <= result["hook_steps"] < 100, (hook, result)
            assert result["accuracy"] > 0.85, (hook, result)
            assert result["ratio"] > 1.5, hook
        if hook in REPLICATED:
            assert ranks[0][hook]["params"] == ranks[1][hook]["params"], hook


# ---------------------------------------------------------------- torchrun restarts
def test_a_killed_worker_restarts_the_job_and_it_ends_bit_exact(tmp_path):
    """SIGKILL a worker under ``torchrun --max-restarts`` while every hook trains its own model
    side by side: the next attempt meets in its own store prefix, every hook resumes from its
    atomic checkpoint and ends where an uninterrupted run ends, bit for bit."""
    import torch

    hooks = list(ENTRIES)
    runs = {}
    for label, extra in (("killed", ["--kill"]), ("straight", [])):
        out = tmp_path / label
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        command += ["--max-restarts", "1", "elastic_run.py", "--hooks", ",".join(hooks), "--out", str(out), *extra]
        done = subprocess.run(command, cwd=CLIENTS, env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (label, done.stdout[-3000:], done.stderr[-6000:])
        runs[label] = {(h, r): torch.load(out / f"{h}_rank{r}.pt", weights_only=False) for h in hooks for r in range(2)}
    for (hook, rank), killed in runs["killed"].items():
        straight = runs["straight"][(hook, rank)]
        assert killed["attempt"] == 1 and killed["resumed_from"] == 8, (hook, killed)
        assert straight["attempt"] == 0 and straight["resumed_from"] == 0
        assert all(torch.equal(a, b) for a, b in zip(killed["params"], straight["params"])), (hook, rank)


# ---------------------------------------------------------------- Hugging Face Trainer
def _transformers_with_torch() -> str | None:
    """Why the Trainer test cannot run here (None: it can)."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    from transformers.utils import is_torch_available

    if not is_torch_available():
        import transformers

        return f"transformers {transformers.__version__} does not support this torch (its own floor)"
    return None


@pytest.mark.skipif(_transformers_with_torch() is not None, reason=str(_transformers_with_torch()))
def test_hugging_face_trainer_with_attach_resumes_bit_exactly(tmp_path):
    import torch

    report = tmp_path / "report"
    report.mkdir()
    # one launch: 20 steps checkpointing every 10, then (fresh model, Trainer and state) a run
    # resumed from the checkpoint at step 10
    checkpoint = tmp_path / "out" / "checkpoint-10"
    command = _torchrun("transformers_run.py", "--hook", "ef-sgdm", "--output", str(tmp_path / "out"))
    done = subprocess.run(
        [*command, "--report", str(report), "--then-resume", str(checkpoint)],
        cwd=CLIENTS,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
    ranks = [torch.load(report / f"rank{r}.pt", weights_only=False) for r in range(2)]
    straight = [r["run"] for r in ranks]
    for rank in straight:
        assert rank["world"] == 2
        assert rank["hook_steps"] == rank["optimizer_steps"] == rank["global_step"] == 20  # accumulation 2
        assert rank["losses"][-1] < 0.6 * rank["losses"][0], rank["losses"]
    assert (checkpoint / "ddp_hooks_rank1.pt").exists()
    resumed = [r["resumed"] for r in ranks]
    for a, b in zip(straight, resumed):
        assert b["hook_steps"] == 20 and b["optimizer_steps"] == 10
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
