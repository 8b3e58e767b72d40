"""Shared helpers for bench scripts: where ../shared is, and the header every benchmark prints."""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBDNET_SHARED", ROOT.parent / "shared"))


def shared(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        sys.exit(f"{path} is absent: this benchmark needs ../shared")
    return path


def header() -> str:
    """The command, machine and date, printed first by every benchmark."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n"
            f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)\n"
            f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}")
