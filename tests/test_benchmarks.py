"""Every benchmark script runs at a tiny size (gloo, CPU), so none can rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import (
    advisor,
    convergence,
    cpu_codec,
    emulate,
    kernels,
    language,
    laq,
    memory,
    powersgd,
    step_time,
)
from ddp_hooks._ext import cpu as native
from ddp_hooks.core import fsdp as fsdp_core

ROOT = Path(__file__).resolve().parent.parent


def test_step_time_tiny(tmp_path, capsys):
    rows = step_time.main(
        [
            "--models",
            "gpt",
            "--size",
            "tiny",
            "--hooks",
            "fp32,ef-sgdm,torch-powersgd",
            "--steps",
            "2",
            "--warmup",
            "2",
            "--batch",
            "2",
            "--workers",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert {(r["model"], r["hook"]) for r in rows} == {("gpt", h) for h in ("fp32", "ef-sgdm", "torch-powersgd")}
    fp32 = next(r for r in rows if r["hook"] == "fp32")
    ef = next(r for r in rows if r["hook"] == "ef-sgdm")
    assert ef["wire_mb"] < fp32["wire_mb"] / 10  # 1 bit instead of 32, both ways
    saved = json.loads((tmp_path / "step_time_gloo.json").read_text())
    assert saved["machine"]["torch"] and saved["rows"]
    assert "one bucket" in capsys.readouterr().out


def test_convergence_tiny(tmp_path):
    runs = convergence.main(
        [
            "--suite",
            "qsparse",
            "--only",
            "SGD,SignTopK H=4",
            "--steps",
            "20",
            "--eval-every",
            "10",
            "--workers",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert [r["label"] for r in runs] == ["SGD", "SignTopK H=4"]
    assert runs[1]["wire_bytes"] < runs[0]["wire_bytes"] / 50
    assert all(0 <= p["accuracy"] <= 1 for r in runs for p in r["points"])
    assert (tmp_path / "convergence_qsparse_digits.json").exists()


def test_language_tiny(tmp_path):
    """Two short runs of the byte-level GPT: DDP every step, streaming DiLoCo (H = 4, 2
    fragments) sends a fragment at a time."""
    language.CONFIGS["Streaming DiLoCo H=4 F=2"] = ("diloco", {"period": 4, "fragments": 2, "delay": 1})
    try:
        runs = language.main(
            ["--only", "DDP fp32,Streaming DiLoCo H=4 F=2", "--steps", "8", "--eval-every", "4", "--workers", "2"]
            + ["--width", "16", "--layers", "1", "--context", "16", "--batch", "4", "--corpus", "300000"]
            + ["--val-windows", "8", "--out", str(tmp_path), "--name", "tiny_language"]
        )
    finally:
        del language.CONFIGS["Streaming DiLoCo H=4 F=2"]
    ddp, streaming = runs
    # finite: an untrained model this small starts near 10
    assert all(0 < p["val_loss"] < 30 for r in runs for p in r["points"])
    assert streaming["fewer_bytes"] > 1.5  # two syncs of each fragment against 8 all-reduces
    assert streaming["peak_sent_bytes"] < 0.8 * ddp["peak_sent_bytes"]
    saved = json.loads((tmp_path / "tiny_language.json").read_text())
    assert [r["label"] for r in saved["runs"]] == ["DDP fp32", "Streaming DiLoCo H=4 F=2"]


def test_language_sweep_runs_only_when_named():
    """The SparseLoCo sweep is not in the default list, and --only accepts its names."""
    assert not set(language.SWEEP) & set(language.CONFIGS)
    with pytest.raises(SystemExit):
        language.main(["--only", "SparseLoCo H=7", "--steps", "1"])


def test_language_corpus_splits_by_file():
    train, val, files = language.corpus(400_000)
    assert files >= 10 and len(val) > 0 and len(train) > 5 * len(val)


def test_convergence_suites_are_well_formed():
    for name in ("hooks", "cser", "qsparse", "nodes", "fsdp"):
        assert all("label" in s and "kind" in s for s in convergence.suite(name))
    cser = {s["label"]: s for s in convergence.suite("cser")}
    import ddp_hooks as dh

    for rc in (32, 256, 1024):
        args = cser[f"CSER RC{rc}"]["args"]
        assert dh.cser_ratio(args["grad_ratio"], args["model_ratio"], args["period"]) == pytest.approx(rc)


def test_laq_tiny(tmp_path):
    rows = laq.main(["--workers", "2", "--iterations", "30", "--eval-every", "10", "--out", str(tmp_path)])
    by = {r["method"]: r for r in rows}
    assert by["GD"]["total_uploads"] == 2 * 30  # GD and QGD upload every round
    assert by["QGD"]["total_uploads"] == 2 * 30
    assert by["LAQ"]["total_uploads"] <= by["QGD"]["total_uploads"]
    assert by["LAQ"]["total_bits"] < by["GD"]["total_bits"]


def test_powersgd_benchmark_tiny(tmp_path):
    powersgd.main(["--models", "tiny", "--steps", "2", "--warmup", "2", "--rounds", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "powersgd_cpu.json").read_text())
    assert {r["config"] for r in saved["hooks"]} == {"torch-default", "torch-batched", "ours-1bucket", "ours-25mb"}


@pytest.mark.skipif(kernels.torch.cuda.is_available(), reason="a GPU is present: the script measures")
@pytest.mark.skipif(not native.available(), reason=f"fused CPU codec {native.status()}")
def test_cpu_codec_benchmark_tiny(tmp_path):
    rows = cpu_codec.main(["--models", "tiny", "--threads", "1", "--repeats", "2", "--out", str(tmp_path)])
    assert [r["step"] for r in rows] == cpu_codec.STEPS
    assert all(r["fused_ms"] > 0 and r["torch_ms"] > 0 for r in rows)
    assert json.loads((tmp_path / "cpu_codec.json").read_text())["rows"]


def test_kernels_benchmark_says_what_it_needs(capsys):
    assert kernels.main([]) == []
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_advisor_prefers_compression_on_slow_links_and_not_on_fast_ones():
    shapes = [(1024, 1024)] * 11
    slow = advisor.predict(shapes, 4, 0.4, advisor.parse_rate("100mbit"), 0.0)
    fast = advisor.predict(
        shapes, 4, 0.4, advisor.parse_rate("400gbit"), 0.0, overhead_s={h: 0.05 for h in advisor.hooks() if h != "fp32"}
    )
    assert slow[0].hook != "fp32" and "Use" in advisor.advise(slow)
    assert fast[0].hook == "fp32" and "No hook pays off" in advisor.advise(fast)
    by = {p.hook: p for p in slow}
    assert by["fp32"].wire_bytes == pytest.approx(4 * 11 * 2**20 * 1.5)  # ring: 2(n-1)/n
    assert by["bf16"].wire_bytes == pytest.approx(by["fp32"].wire_bytes / 2)
    assert advisor.parse_rate("1gbit") == 1.25e8


def test_advisor_validates_against_emulation_results(tmp_path):
    def result(rate, measured, fp32_ms, bf16_ms):
        return {
            "rate": rate,
            "measured_rate": measured,
            "world_size": 2,
            "size": "tiny",
            "rows": [
                {"model": "resnet18", "hook": "fp32", "step_ms": fp32_ms, "compute_ms": 100.0},
                {"model": "resnet18", "hook": "bf16", "step_ms": bf16_ms, "compute_ms": 100.0},
            ],
        }

    (tmp_path / "a.json").write_text(json.dumps(result("unshaped", "1e10", 101.0, 102.0)))
    (tmp_path / "b.json").write_text(json.dumps(result("100mbit", "1e8", 350.0, 230.0)))
    rows = advisor.validate([str(tmp_path / "a.json"), str(tmp_path / "b.json")], advisor.shapes_of)
    assert {r["hook"] for r in rows} == {"fp32", "bf16"}
    assert all(r["rate"] == "100mbit" and r["predicted_ms"] > 100 for r in rows)


def test_advisor_two_level_model_sends_each_nodes_message_once():
    shapes = [(1024, 1024)] * 16
    mb = 16 * 4  # fp32 model size in MB
    inter, intra = advisor.parse_rate("1gbit"), advisor.parse_rate("800gbit")
    rows = {r["hook"]: r for r in advisor.predict_nodes(shapes, 4, 8, 0.1, inter, intra)}
    # fp32: a ring over 32 ranks crosses each node's NIC once; node-aware, a ring over 4 nodes
    assert rows["fp32"]["flat_mb"] == pytest.approx(mb * 2 * 31 / 32)
    assert rows["fp32"]["node_mb"] == pytest.approx(mb * 2 * 3 / 4)
    # a ring all-gather (Qsparse): (N - 1) / (N L - 1) of the flat bytes; the sharded exchange
    # (dist-EF-SGDM): its all-to-all leaves the node L times flat, once node-aware
    assert rows["qsparse"]["node_mb"] == pytest.approx(rows["qsparse"]["flat_mb"] * 3 / 31)
    assert rows["ef-sgdm"]["node_mb"] < rows["ef-sgdm"]["flat_mb"] / 4
    for hook in ("ef-sgdm", "qsparse"):
        assert rows[hook]["node_ms"] < rows[hook]["flat_ms"], hook
    # inside a node the exact mean and the gather cost two fp32 all-reduces on 8 ranks
    slow_inside = {r["hook"]: r for r in advisor.predict_nodes(shapes, 4, 8, 0.1, inter, inter / 100)}
    assert slow_inside["qsparse"]["node_ms"] > slow_inside["qsparse"]["flat_ms"]


def test_advisor_cli(capsys):
    advisor.main(["--params", "11.7e6", "--compute-ms", "400", "--world", "4", "--bandwidth", "1gbit"])
    out = capsys.readouterr().out
    assert "fp32" in out and "Use" in out
    advisor.main(["--params", "11.7e6", "--compute-ms", "400", "--nodes", "2", "--per-node", "4"])
    out = capsys.readouterr().out
    assert "node ms" in out and "fastest:" in out


def test_emulate_tiny(tmp_path):
    why = emulate.check_privileges()
    if why:
        pytest.skip(why)
    results = emulate.main(
        [
            "--workers",
            "2",
            "--rates",
            "100mbit",
            "--models",
            "gpt",
            "--size",
            "tiny",
            "--hooks",
            "fp32,ef-sgdm,qsparse",
            "--steps",
            "3",
            "--warmup",
            "0",
            "--batch",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    (result,) = results
    assert 60e6 < float(result["measured_rate"]) < 140e6  # the shaping took effect
    rows = {r["hook"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "ef-sgdm", "qsparse"}
    # each worker's link counted by the shaper, from the first step (DDP's rebuild included)
    fp32, ef = rows["fp32"], rows["ef-sgdm"]
    assert fp32["wire_mb"] <= fp32["link_mb"] < 1.3 * fp32["wire_mb"], fp32  # TCP/IP headers on top
    assert ef["link_mb"] < fp32["link_mb"] / 10, (ef, fp32)
    assert not _own_namespaces()  # everything it created is gone


def test_emulate_nodes_counts_the_bytes_between_nodes_on_the_links(tmp_path):
    """2 nodes x 2 workers, unshaped: the bytes each node's link sent, read from the kernel's
    counter, match the library's own count of inter-node bytes (plus TCP/IP headers), flat
    and node-aware, and node-aware Qsparse puts less on the link than flat."""
    why = emulate.check_privileges()
    if why:
        pytest.skip(why)
    args = ["--nodes", "2", "--workers-per-node", "2", "--rates", "unshaped", "--models", "gpt", "--size", "tiny"]
    args += ["--batch", "2"]
    args += ["--hooks", "fp32,qsparse", "--steps", "4", "--warmup", "1", "--out", str(tmp_path)]
    (result,) = emulate.main(args)
    rows = {r["hook"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "qsparse"} and not _own_namespaces()
    fp32 = rows["fp32"]
    # node-aware, every inter-node byte the library counts crosses the link; flat, a ring over 4
    # ranks crosses it once per node: 1/2 of what the node's two ranks count
    assert fp32["node_stats_mb"] <= fp32["node_link_mb"] < 1.1 * fp32["node_stats_mb"], fp32
    assert fp32["flat_stats_mb"] / 2 <= fp32["flat_link_mb"] < 1.1 * fp32["flat_stats_mb"] / 2, fp32
    assert rows["qsparse"]["node_link_mb"] < rows["qsparse"]["flat_link_mb"]
    assert {g["hook"] for g in result["goals"]} == {"fp32", "qsparse"}


FSDP2 = fsdp_core.torch_version() >= fsdp_core.MIN_TORCH


@pytest.mark.skipif(not FSDP2, reason="FSDP2's all-reduce hook needs torch 2.7")
def test_emulate_fsdp_counts_the_bytes_between_replicas_on_the_links(tmp_path):
    """HSDP over 2 nodes x 2 workers, unshaped: native HSDP and the exact hook put the same
    bytes on the links (each node's two shards once each way), within TCP/IP headers of the
    library's own count; EF-SGDM far fewer."""
    why = emulate.check_privileges()
    if why:
        pytest.skip(why)
    args = ["--nodes", "2", "--workers-per-node", "2", "--fsdp", "--rates", "unshaped", "--models", "gpt"]
    args += ["--size", "tiny", "--batch", "2", "--hooks", "fp32,ef-sgdm", "--steps", "2", "--warmup", "1"]
    (result,) = emulate.main(args + ["--out", str(tmp_path)])
    rows = {r["hook"]: r for r in result["rows"]}
    assert set(rows) == {"native-hsdp", "fp32", "ef-sgdm"} and not _own_namespaces()
    assert rows["fp32"]["stats_mb"] <= rows["fp32"]["link_mb"] < 1.1 * rows["fp32"]["stats_mb"], rows["fp32"]
    assert rows["native-hsdp"]["link_mb"] == pytest.approx(rows["fp32"]["link_mb"], rel=0.05)
    assert rows["ef-sgdm"]["bytes_ratio"] > 10, rows["ef-sgdm"]
    assert (tmp_path / "emulate_fsdp2x2_unshaped.json").exists()


@pytest.mark.skipif(not FSDP2, reason="FSDP2's all-reduce hook needs torch 2.7")
def test_step_time_and_convergence_run_sharded_models(tmp_path):
    rows = step_time.main(
        ["--fsdp", "2", "--workers", "4", "--models", "gpt", "--size", "tiny", "--hooks", "fp32,ef-sgdm"]
        + ["--steps", "1", "--warmup", "1", "--batch", "2", "--out", str(tmp_path)]
    )
    assert [r["hook"] for r in rows] == ["native-hsdp", "fp32", "ef-sgdm"]
    assert rows[2]["stats_mb"] < rows[1]["stats_mb"] / 10
    runs = convergence.main(
        ["--suite", "fsdp", "--only", "native HSDP,fp32", "--steps", "10", "--eval-every", "5", "--out", str(tmp_path)]
    )
    native, exact = runs
    assert native["wire_bytes"] == exact["wire_bytes"] > 0  # the native count is the exact hook's
    assert native["final_accuracy"] == exact["final_accuracy"]  # the same training, bit for bit


def test_emulate_links_are_per_worker_or_shared():
    """Two 8 MB flows at once in opposite directions: on a shared link both pass through the
    one shaped device; on per-worker links each worker's shaped veth carries only its own
    traffic (what it sends leaves through its inner end, what it receives through its outer
    end). Checked on the shapers' byte counters."""
    why = emulate.check_privileges()
    if why:
        pytest.skip(why)
    mb = 8 << 20
    for link in ("per-worker", "shared"):
        with emulate.Topology(2, "100mbit", shared=link == "shared") as topo:
            before = topo.shaped_bytes()
            emulate.measure_flows(topo, [(0, 1), (1, 0)], megabytes=8)
            sent = {k: v - before[k] for k, v in topo.shaped_bytes().items()}
            if link == "shared":
                assert set(sent) == {"ifb"}
                assert 2 * mb <= sent["ifb"] < 2.4 * mb, sent  # both flows, plus headers and acks
            else:
                assert set(sent) == {"v0", "h0", "v1", "h1"}
                for i in (0, 1):  # its own flow's data plus the acks of the other flow
                    assert mb <= sent[f"v{i}"] < 1.2 * mb, sent
                    assert mb <= sent[f"h{i}"] < 1.2 * mb, sent
    assert not _own_namespaces()


def _own_namespaces() -> list[str]:
    """The namespaces this process's topologies made that still exist (other tests may have
    their own at the same time)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return [n for n in names if n.startswith(emulate.tag_of(os.getpid()) + "n")]


def test_emulate_refuses_clearly_without_root():
    code = (
        f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); os.geteuid = lambda: 1000\n"
        "from benchmarks import emulate; emulate.main(['--rates', 'unshaped'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert "needs root" in done.stderr


def test_memory_no_live_tensor_growth_after_warm_up(tmp_path):
    rows = memory.main(["--hooks", "ef-sgdm,laq,qsparse", "--steps", "60", "--warmup", "15", "--out", str(tmp_path)])
    assert [r["hook"] for r in rows] == ["ef-sgdm", "laq", "qsparse"]
    for r in rows:  # a tensor kept per step would add about 45 here
        assert r["live_growth"] <= 8, r
    assert json.loads((tmp_path / "memory.json").read_text())["rows"]


# ---------------------------------------------------------------- command lines as users type them
def test_step_time_under_torchrun_runs_every_model(tmp_path):
    """Two models under torchrun: every rank takes part in both (the other ranks used to
    return after the first, and rank 0 died waiting for them)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(ROOT / "benchmarks" / "step_time.py"), "--models", "resnet18,gpt", "--size", "tiny"]
    command += ["--hooks", "fp32,ef-sgdm", "--steps", "1", "--warmup", "1", "--batch", "2", "--out", str(tmp_path)]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-12000:])
    saved = json.loads((tmp_path / "step_time_gloo.json").read_text())
    assert {(r["model"], r["hook"]) for r in saved["rows"]} == {
        (m, h) for m in ("resnet18", "gpt") for h in ("fp32", "ef-sgdm")
    }
    assert saved["world_size"] == 2


CHOICE_ARGUMENTS = [
    (step_time, "--models", "resnet18"),
    (step_time, "--hooks", "ef-sgdm"),
    (emulate, "--models", "resnet18"),
    (emulate, "--hooks", "qsparse"),
    (powersgd, "--models", "resnet18"),
    (cpu_codec, "--models", "resnet18"),
    (memory, "--hooks", "powersgd"),
]


@pytest.mark.parametrize("module,flag,example", CHOICE_ARGUMENTS, ids=lambda v: getattr(v, "__name__", v))
def test_choice_arguments_are_listed_and_checked(module, flag, example, capsys):
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    assert example in capsys.readouterr().out  # --help lists the choices
    with pytest.raises(SystemExit) as exited:
        module.main([flag, f"{example},nonesuch"])
    assert exited.value.code == 2  # a usage error, before any work
    err = capsys.readouterr().err
    assert "nonesuch" in err and example in err, err


def test_convergence_only_names_unknown_labels(capsys):
    with pytest.raises(SystemExit):
        convergence.main(["--suite", "qsparse", "--only", "SGD,Nope"])
    err = capsys.readouterr().err
    assert "Nope" in err and "SignTopK H=4" in err


@pytest.mark.parametrize("suite", ["hooks", "cser", "qsparse", "nodes"])
def test_every_curve_has_its_own_look(suite):
    labels = [s["label"] for s in convergence.suite(suite, 2)]
    looks = convergence.styles(labels)
    assert len(set(looks.values())) == len(labels), looks
    for a in labels:  # one colour per hook, whatever its mode
        for b in labels:
            if a.split(" ")[0] == b.split(" ")[0]:
                assert looks[a][0] == looks[b][0], (a, b)
            else:
                assert looks[a][0] != looks[b][0], (a, b)


def test_readme_benchmark_examples_run_as_printed(tmp_path):
    """Every ``python benchmarks/advisor.py ...`` line of the README runs and exits 0."""
    lines = [
        line.strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.strip().startswith("python benchmarks/advisor.py")
    ]
    assert lines, "the README shows an advisor example"
    for line in lines:
        argv = line.split()[2:]
        done = subprocess.run(
            [sys.executable, "benchmarks/advisor.py", *argv], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, (line, done.stderr[-2000:])
        assert "fp32" in done.stdout
