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
