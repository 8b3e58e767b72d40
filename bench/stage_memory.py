"""Peak RSS per stage of one ``cbdnet compress`` run: where the memory of a calibrated budget goes.

    python bench/stage_memory.py --model torchvision:resnet50:16 --target-bits 3.0

Runs the CLI's ``compress`` in this process (the flags ``bench/scale.py`` builds: for ``torchvision:NAME:K``
random weights, seed 0, ``K`` generated noise images in an ``imagefolder:``; for ``cifar-resnetN`` the pretrained
weights of ``--shared``) with each stage of :func:`cbdnet.calib.compress` wrapped: a
thread reads ``VmRSS`` every 20 ms and keeps the peak of the stage running then (a nested stage, such as the
budget's GPTQ search inside the budget, has its own row). It prints the command, the machine, each stage's peak
and its RSS on entry and exit (what the stages before it left held), and ``ru_maxrss``. The wrappers name
private functions of the pipeline: a stage that was renamed is reported as missing, not silently skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from scale import command, machine  # noqa: E402  (bench/ is not a package)

# (module, function, stage name): the stages in the order they run
STAGES = [("cbdnet.format.fit", "compress_layers_of", "compress (whole calib.compress)"),
          ("cbdnet.calib.pipeline", "_calibrate", "statistics"),
          ("cbdnet.calib.pipeline", "_budget_encoder", "budget (screen, search)"),
          ("cbdnet.calib.pipeline", "choose_refined", "budget: GPTQ search"),
          ("cbdnet.calib.pipeline", "compress_layers", "walk (encode layers)"),
          ("cbdnet.calib.pipeline", "refit_levels", "refit"),
          ("cbdnet.calib.pipeline", "_correct", "bias correction, losses"),
          ("cbdnet.calib.pipeline", "fold_batchnorm", "fold BatchNorm"),
          ("cbdnet.format.fit", "_measured", "encode file")]


class Stages:
    """The running stage (a stack) and each stage's peak RSS, entry and exit RSS."""

    def __init__(self) -> None:
        self.stack = ["outside calib.compress"]
        self.peak: dict[str, float] = {}
        self.events: list[tuple[float, str, str, float]] = []
        self.start = time.perf_counter()

    def sample(self) -> None:
        while True:
            self._note(self.stack[-1], rss_mb())
            time.sleep(0.02)

    def _note(self, stage: str, rss: float) -> None:
        self.peak[stage] = max(self.peak.get(stage, 0.0), rss)

    def wrap(self, function, stage: str):
        @functools.wraps(function)
        def inner(*args, **kwargs):
            self._event("enter", stage)
            self.stack.append(stage)
            try:
                return function(*args, **kwargs)
            finally:
                self.stack.pop()
                self._event("leave", stage)
        return inner

    def _event(self, what: str, stage: str) -> None:
        rss = rss_mb()
        self._note(stage, rss)
        self.events.append((time.perf_counter() - self.start, what, stage, rss))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="torchvision:NAME:IMAGES or cifar-resnetN[:IMAGES] (bench/scale.py)")
    p.add_argument("--target-bits", type=float, default=3.0)
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder with models/ and data/")
    p.add_argument("--extra", default="", help="more compress flags")
    return p.parse_args()


def main() -> None:
    import importlib

    args = parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("machine:", json.dumps(machine()))
    stages = Stages()
    missing = []
    for module_name, function, stage in STAGES:
        module = importlib.import_module(module_name)
        if not hasattr(module, function):
            missing.append(f"{module_name}.{function}")
            continue
        setattr(module, function, stages.wrap(getattr(module, function), stage))
    threading.Thread(target=stages.sample, daemon=True).start()
    from cbdnet.cli import main as cli

    with tempfile.TemporaryDirectory(prefix="cbdnet-stages-") as tmp:
        work = Path(tmp)
        flags = command(args.model, args, work)[0][3:]  # bench/scale.py's flags, without "python -m cbdnet"
        stages.start = time.perf_counter()
        status = cli(flags)
    print(f"exit {status}, {time.perf_counter() - stages.start:.1f} s; stages not found: {missing or 'none'}")
    for stage in ["outside calib.compress"] + [name for _, _, name in STAGES]:
        if stage in stages.peak:
            print(f"{stage:34s} peak {stages.peak[stage]:7.0f} MB")
    for seconds, what, stage, rss in stages.events:
        print(f"{seconds:8.1f} s  {what:5s} {stage:34s} RSS {rss:7.0f} MB")
    print(f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
