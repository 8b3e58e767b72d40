"""The ``cbdnet`` argument parser, in one place, without importing torch: ``cbdnet --help``, ``--version`` and
``SUBCOMMAND --help`` answer from here before any of the library is loaded (each subcommand's function is
imported on first call, see :func:`_lazy`).

Every subcommand's options are in argument groups (model, method, budget and calibration, evaluation, outputs,
run), each option's help ends with its default where it has one, and each subcommand's ``--help`` ends with
examples. To add a flag: put it in the group it belongs to, in the subcommand's function below (``_compress``,
``_eval``, ``_export``, ``_info``, ``_sweep``, ``_demo``; or in ``_model_group``/``_budget_group``/``_run_group``
where several subcommands share it); its help says what it does and, where the default
is ``None`` because the library resolves it, what that default is. A ``compress`` option that sets a config
field (method, budget and calibration flags) is not written here: it is declared once in :mod:`cbdnet.options`,
and :func:`_add_options` builds its flag from that declaration (the configs and the sweep spec check the same).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import NoReturn

from .. import options
from .._version import __version__
from ..errors import CBDError
from ..options import FALLBACK_RULES, GRANULARITIES, METHODS

__all__ = ["build_parser", "parse_only", "one_line", "bounded", "ARCHS", "FALLBACK_RULES", "GRANULARITIES",
           "CALIBRATION_METHODS", "METHODS", "MAX_ARCH_ARG", "MAX_SEED", "MAX_BATCH"]

# The library's own choices, written out so that the parser needs no torch; tests/cli/test_cli_help.py checks each
# against the module that defines it (cbdnet.zoo.models.known_archs, cbdnet.export.onnx, cbdnet.format.cbdfile),
# so they cannot drift apart. The compress options' choices, ranges and defaults come from cbdnet.options.
ARCHS = ("cifar-resnet110", "cifar-resnet20", "cifar-resnet32", "cifar-resnet44", "cifar-resnet56", "densenet121",
         "digits-cnn", "resnet18", "segnet", "segnet-basic", "ssd300", "vgg16")
CALIBRATION_METHODS = ("mse", "minmax")
MAX_ARCH_ARG = 100_000
MAX_SEED = 2**63 - 1
MAX_BATCH = 1 << 20
PROG = "cbdnet"


def one_line(text: str) -> str:
    """``text`` on one line (stripped lines joined by `` / ``), at most 500 characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " / ".join(lines)[:500] if lines else "(no message)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr with the one prefix of every cbdnet error
    (``cbdnet: error: ...``, subcommands included), exit code 2, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {one_line(message)} (see {self.prog} --help)\n")


class _Formatter(argparse.HelpFormatter):
    """Descriptions wrapped, examples (text of several lines) kept as written; ``(default: X)`` after every
    option that has a default and does not say it."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text or isinstance(action, argparse.BooleanOptionalAction)):
            return text
        return f"{text} (default: %(default)s)"


def bounded(flag: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in ``[low, high]`` (a usage error, exit 2, naming the flag otherwise)."""
    def parse(text: str) -> int:
        from ..fileio.inputs import parse_positive_int  # numpy, on parsing only: not for --help

        try:
            return parse_positive_int(text, name=flag, low=low, high=high)
        except CBDError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = flag
    return parse


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The subcommand function ``name`` of ``cbdnet.cli.<module>``, imported (with torch) on first call."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(args)

    run.__name__ = name
    return run


def _subparser(sub, name: str, help_text: str, description: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=description, formatter_class=_Formatter,
                          epilog="examples:\n" + examples.strip("\n"))


def _run_group(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = p.add_argument_group("run", "how the command runs")
    group.add_argument("--quiet", action="store_true", help="no progress bars or tables: errors only")
    group.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return group


def _model_group(p: argparse.ArgumentParser, title: str, description: str) -> argparse._ArgumentGroup:
    group = p.add_argument_group(title, description)
    group.add_argument("--arch", help="architecture: " + ", ".join(ARCHS) + ", torchvision:NAME (any torchvision "
                       "classification or segmentation model) or module.path:factory (your own code)")
    group.add_argument("--weights", help="checkpoint (state dict) path, 'random' (seeded by --seed), or "
                       "'torchvision' (the default torchvision weights of resnet18/vgg16/densenet121/ssd300 from "
                       "torch's local cache; never downloaded) (default: random)")
    group.add_argument("--seed", type=bounded("--seed", 0, MAX_SEED), default=0,
                       help="seed of the initialisation for --weights random")
    group.add_argument("--num-classes", type=bounded("--num-classes", 1, MAX_ARCH_ARG), default=None,
                       help="class count of the checkpoint's head, e.g. 21 for a VOC-trained ssd300 (default: the "
                            "architecture's own: 1000 ImageNet, 91 COCO for ssd300, 11 CamVid for segnet)")
    return group


def _batch_size(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--batch-size", type=bounded("--batch-size", 1, MAX_BATCH), default=500,
                       help="images per forward pass when evaluating (lower it if memory is short; the scores "
                            "do not depend on it)")


def _compress(sub) -> None:
    p = _subparser(sub, "compress", "compress a model to a .cbd file",
                   "Compress a pretrained model's conv and linear weights into a .cbd file and print one row per "
                   "layer and the whole file's bits per weight. Without --method: the paper's composite binary "
                   "code (cbd); with --target-bits: the best code per layer within a budget of the whole "
                   "file's bits per weight, chosen on --calib images.", """
  # the paper's code, evaluated before and after
  cbdnet compress --arch cifar-resnet20 --weights r20.th --planes 5 --bottleneck 0.3 --fallback size \\
      -o r20.cbd --data cifar10-npz:cifar10_test.npz
  # the best code per layer within 3 bits per weight of the whole file, calibrated on training images
  cbdnet compress --arch cifar-resnet20 --weights r20.th --target-bits 3 --calib cifar10-npz:calib.npz -o r20.cbd
  # the round-to-nearest baseline, 4 bits per channel, its report as JSON
  cbdnet compress --arch resnet18 --weights torchvision --method rtn --bits 4 -o r18.cbd --json r18.json
""")
    _model_group(p, "model", "what to compress (a registered architecture and its checkpoint)")
    method = p.add_argument_group("method", "the code each layer's weights are stored with")
    _add_options(method, "method")
    method.add_argument("--skip", nargs="*", help="layer names to keep in float")
    _budget_group(p)
    evaluation = p.add_argument_group("evaluation", "score the model before and after (optional)")
    evaluation.add_argument("--data", help="data spec to evaluate on, e.g. cifar10-npz:PATH, imagefolder:PATH, "
                                           "digits (default: no evaluation)")
    _batch_size(evaluation)
    outputs = p.add_argument_group("outputs", "what is written (an existing file is replaced only with --force)")
    outputs.add_argument("-o", "--output", help="the compressed model, a .cbd file (default: nothing is written)")
    outputs.add_argument("--json", help="the report as JSON ('-': standard output)")
    outputs.add_argument("--force", action="store_true", help="overwrite existing output files")
    outputs.add_argument("--no-fold-bn", action="store_true",
                         help="keep each BatchNorm as it is instead of folding it into the per-channel steps of "
                              "the layer before it (the file then stores its scale, mean and variance too)")
    outputs.add_argument("--float32", action="store_true",
                         help="keep float tensors (BatchNorm, biases) at their own precision instead of rounding "
                              "them to float16 where float16 is precise enough")
    run = _run_group(p)
    run.add_argument("--workers", type=bounded("--workers", 1, 256), default=None,
                     help="layers encoded at once in threads, same result (default 1, or $CBDNET_WORKERS)")
    p.set_defaults(func=_lazy("commands", "cmd_compress"))


def _add_options(group: argparse._ArgumentGroup, name: str) -> None:
    """The compress options of one group, as :mod:`cbdnet.options` declares them: flag, type checker (the
    configs' own check), choices, help with range and default. Every default here is None, so that the library
    knows which options were given (:func:`cbdnet.calib.configs.config_from_options`)."""
    for opt in options.OPTIONS:
        if opt.group != name:
            continue
        flags = [opt.flag, opt.short] if opt.short else [opt.flag]
        if opt.kind == "bool":
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=opt.help_text())
        elif opt.kind == "data":
            group.add_argument(*flags, default=None, help=opt.help_text())
        else:
            group.add_argument(*flags, type=opt.parse, choices=opt.choices or None, default=None,
                               metavar=opt.metavar, help=opt.help_text())


def _budget_group(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "budget and calibration", "choose each layer's code within a size budget, and correct the rounding on "
        "calibration images (training images, never the test set)")
    _add_options(group, "budget")


def _eval(sub) -> None:
    p = _subparser(sub, "eval", "accuracy of a .cbd file, an .onnx file or a float model",
                   "Evaluate a compressed .cbd file, an exported .onnx file (ONNX Runtime) or a float "
                   "checkpoint (--arch/--weights) on a data spec: top-1/top-5, mIoU or mAP@0.5 by task.", """
  cbdnet eval r20.cbd --data cifar10-npz:cifar10_test.npz
  cbdnet eval r20.onnx --data cifar10-npz:cifar10_test.npz --threads 4 --json eval.json
  cbdnet eval --arch cifar-resnet20 --weights r20.th --data cifar10-npz:cifar10_test.npz   # the float model
""")
    p.add_argument("file", nargs="?", help=".cbd or .onnx file (or give --arch/--weights for a float checkpoint)")
    model = _model_group(p, "model", "a float checkpoint instead of FILE, or the architecture a .cbd file is "
                                     "loaded into (default: the one the file names)")
    model.add_argument("--threads", type=int, default=None, help=".onnx: ONNX Runtime intra-op threads (default 1)")
    evaluation = p.add_argument_group("evaluation")
    evaluation.add_argument("--data", required=True, help="data spec, e.g. cifar10-npz:PATH, imagefolder:PATH, "
                                                          "camvid-npz:PATH, voc:PATH, digits (required)")
    _batch_size(evaluation)
    outputs = p.add_argument_group("outputs", "what is written (an existing file is replaced only with --force)")
    outputs.add_argument("--json", help="the result as JSON ('-': standard output)")
    outputs.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    _run_group(p)
    p.set_defaults(func=_lazy("commands", "cmd_eval"))


def _export(sub) -> None:
    p = _subparser(sub, "export", "export a .cbd file for deployment (ONNX, QDQ int8)",
                   "Export a .cbd file to ONNX: the weights as exact int8 levels (DequantizeLinear), and with "
                   "--int8 the activations quantized too (calibrated), so that ONNX Runtime runs integer kernels.",
                   """
  cbdnet export r20.cbd                                   # writes r20.onnx beside it
  cbdnet export r20.cbd -o r20_int8.onnx --int8 --calib cifar10-npz:calib.npz --json export.json
""")
    p.add_argument("file", help=".cbd file")
    model = p.add_argument_group("model", "the architecture the file is loaded into")
    model.add_argument("--arch", help="architecture to build (default: the one the file names)")
    model.add_argument("--num-classes", type=int, default=None, help="class count of the architecture's head")
    model.add_argument("--input-shape", help="example input N,C,H,W (default: the architecture's, e.g. 1,3,32,32)")
    int8 = p.add_argument_group("int8 activations", "quantize the activations too, calibrated on training images")
    int8.add_argument("--int8", action="store_true", help="quantize activations too, so ONNX Runtime runs integer "
                                                          "kernels; needs --calib")
    int8.add_argument("--calib", help="calibration data spec (training images) for --int8, e.g. "
                                      "cifar10-npz:../shared/data/cifar10_calib1000.npz")
    int8.add_argument("--calib-images", type=int, default=None, help="use only the first N calibration images "
                                                                     "(default: all)")
    int8.add_argument("--activations", choices=("uint8", "int8"), default="uint8",
                      help="activation type under --int8 (uint8: ONNX Runtime fuses every Conv on AVX2 CPUs)")
    int8.add_argument("--calib-method", choices=CALIBRATION_METHODS, default="mse",
                      help="--int8 activation ranges: mse (least quantization squared error over the calibration "
                           "set) or minmax (the observed extremes)")
    outputs = p.add_argument_group("outputs", "what is written (an existing file is replaced only with --force)")
    outputs.add_argument("--format", choices=("onnx",), default="onnx", help="output format")
    outputs.add_argument("-o", "--output", help="output .onnx file (default: FILE's name with .onnx, beside it)")
    outputs.add_argument("--json", help="the export report as JSON ('-': standard output)")
    outputs.add_argument("--force", action="store_true", help="overwrite existing output files")
    _run_group(p)
    p.set_defaults(func=_lazy("export_cmd", "cmd_export"))


def _info(sub) -> None:
    p = _subparser(sub, "info", "show (and --verify) a .cbd file",
                   "Show a .cbd file: the whole file's bits per weight first, then per layer the code, planes, "
                   "GF(2) ranks and the bits the file spends, as `compress` printed them.", """
  cbdnet info r20.cbd --verify
  cbdnet info r20.cbd --arch cifar-resnet20 --json info.json
""")
    p.add_argument("file", nargs="?", help=".cbd file")
    model = p.add_argument_group("model", "check that the file fits an architecture (optional)")
    model.add_argument("--arch", help="architecture (registered, torchvision:NAME or module.path:factory)")
    model.add_argument("--num-classes", type=bounded("--num-classes", 1, MAX_ARCH_ARG), default=None,
                       help="class count of the architecture's head")
    checks = p.add_argument_group("checks and outputs")
    checks.add_argument("--verify", action="store_true", help="re-check the checksum and every factorisation")
    checks.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="the information as JSON to PATH ('-' or no PATH: standard output)")
    checks.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    _run_group(p)
    p.set_defaults(func=_lazy("commands", "cmd_info"))


def _sweep(sub) -> None:
    p = _subparser(sub, "sweep", "compress + evaluate a grid of settings (a TOML spec) on Dask workers; resumable",
                   "Compress and evaluate every point of a TOML spec ([model], [data], [[point]] tables) on Dask "
                   "workers; write DIR/results.csv, results.json, results.md and DIR/pareto.png. A rerun "
                   "resumes: finished points are kept.", """
  cbdnet sweep sweep.toml -o runs/r20
  cbdnet sweep sweep.toml -o runs/r20 --cluster tcp://scheduler:8786 --metric top1
""")
    p.add_argument("spec", help="sweep spec (TOML: [model], [data], [[point]] tables; see README)")
    workers = p.add_argument_group("workers")
    workers.add_argument("--cluster", help="address of an existing Dask scheduler, e.g. tcp://HOST:8786 (default: a "
                                           "local cluster of worker processes)")
    workers.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per CPU, "
                                                                   "at most one per point)")
    outputs = p.add_argument_group("outputs")
    outputs.add_argument("-o", "--output", required=True, help="output folder (created; rerun to resume)")
    outputs.add_argument("--metric", default=None, help="metric to plot (default: top1, or miou for segmentation)")
    outputs.add_argument("--force", action="store_true", help="write into an existing non-empty folder that holds no "
                                                              "sweep (a sweep's own folder is resumed without it)")
    _run_group(p)
    p.set_defaults(func=_lazy("sweep_cmd", "cmd_sweep"))


def _demo(sub) -> None:
    p = _subparser(sub, "demo", "train a small CNN, compare the paper's code, the baseline and a calibrated budget",
                   "Train a small CNN on scikit-learn's bundled 8x8 digits (no download, no ../shared), compress it "
                   "with the paper's code, the round-to-nearest baseline and the calibrated budget at a few sizes, "
                   "reload every file and print one table (whole-file bits per weight, accuracy, agreement with "
                   "and KL from the float model) and a plot.", """
  cbdnet demo
  cbdnet demo --out-dir demo_out --seed 1      # keep the .cbd files and the plot
""")
    outputs = p.add_argument_group("outputs")
    outputs.add_argument("--out-dir", default=None, help="keep the demo's .cbd files and plot in this folder "
                                                         "(default: a temporary folder, removed at the end)")
    outputs.add_argument("--plot", default=None, metavar="PATH",
                         help="write the plot here ('': no plot) (default: DIR/cbdnet-demo.png with --out-dir, "
                              "else cbdnet-demo.png in the current folder unless one is there already)")
    outputs.add_argument("--force", action="store_true", help="overwrite the demo's existing files")
    run = _run_group(p)
    run.add_argument("--seed", type=bounded("--seed", 0, MAX_SEED), default=0,
                     help="seed of the training (initialisation and batch order) and of the calibration sample")
    p.set_defaults(func=_lazy("commands", "cmd_demo"))


def build_parser() -> argparse.ArgumentParser:
    """The ``cbdnet`` parser: one subparser per command, each with its option groups and examples."""
    parser = _Parser(prog=PROG, formatter_class=_Formatter,
                     description="Compress pretrained CNNs by composite binary decomposition (CBDNet), without "
                                 "retraining, into .cbd files; evaluate, inspect and export them.",
                     epilog="examples:\n  cbdnet demo\n  cbdnet compress --help\n"
                            "  cbdnet compress --arch resnet18 --weights torchvision --target-bits 3 "
                            "--calib imagefolder:train/ -o r18.cbd\n\nrun `cbdnet COMMAND --help` for a command's "
                            "options and examples")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_compress, _eval, _export, _info, _sweep, _demo):
        add(sub)
    return parser


def parse_only(argv: list[str] | None) -> int | None:
    """Parse ``argv`` without loading the library: the exit code where the parser answered by itself
    (``--help``, ``--version``, a usage error), None where a command is to run."""
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else 2
    return None

