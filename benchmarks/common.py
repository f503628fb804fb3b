"""What every benchmark shares: machine description, tables, JSON results."""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The machine, software and command a result was measured with."""
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(name: str, payload: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` plus the machine description to ``results/<name>.json``."""
    path = Path(out_dir or RESULTS) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str) + "\n")
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Format rows as a text table; columns are (key, header, format spec)."""
    heads = [h for _, h, _ in columns]
    cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def comma_choices(parser: Any, flag: str, value: str, allowed: Iterable[str]) -> list[str]:
    """``value`` (comma-separated) as a list; an item not in ``allowed`` is a usage error
    (``parser.error``) that names it and every choice."""
    allowed = list(allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        parser.error(f"{flag}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
    return items


def listing(allowed: Iterable[str]) -> str:
    """The ``--help`` text of a comma-separated choice argument."""
    return "comma-separated, from: " + ", ".join(allowed)


def wait_all(procs: list[subprocess.Popen], timeout: float, what: str) -> None:
    """Wait for every worker (``timeout`` seconds in all), kill what is left, raise if any failed."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed {what} (exit codes {[p.returncode for p in procs]})")
