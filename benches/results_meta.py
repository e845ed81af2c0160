"""Provenance shared by every bench script: machine, date, commit, so committed results
say what was measured where."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "results"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def provenance() -> dict[str, Any]:
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else ""),
        "machine": machine(),
    }


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command a result records: `python benches/<script>` and its arguments (`argv`,
    else the process's own)."""
    return " ".join(["python", f"benches/{script}", *(sys.argv[1:] if argv is None else argv)])


def smoke_dir(quick: bool) -> Path | None:
    """`write_result`'s out_dir for a run: a fresh temp dir for a smoke (`--quick`) run, so it
    never overwrites the committed results, unless ALORA_RESULTS_DIR names a folder; None
    (the default) otherwise."""
    if not quick or "ALORA_RESULTS_DIR" in os.environ:
        return None
    return Path(tempfile.mkdtemp(prefix="alora-bench-"))


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write `payload` plus provenance (and the command, for a bench script run as such) to
    `<out_dir>/<name>.json` (default benches/results)."""
    out = out_dir or Path(os.environ.get("ALORA_RESULTS_DIR", RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({**_own_command(), **provenance(), **payload}, indent=2) + "\n")
    return path


def _own_command() -> dict[str, str]:
    """{"command": ...} when this process is a bench script run as such, so every result says
    how to make it again; a payload's own "command" wins."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or script.parent != ROOT / "benches" or script.suffix != ".py":
        return {}
    return {"command": command_line(script.name)}
