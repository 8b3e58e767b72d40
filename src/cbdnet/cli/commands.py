"""The ``cbdnet`` command line: ``compress``, ``eval``, ``export``, ``info``, ``sweep`` and ``demo``.

Every failure ends in one line on stderr: exit code 2 for bad input or usage, 1 for an internal error;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import NoReturn

import torch

from .. import __version__
from ..calib import CalibrationConfig
from ..calib.configs import OPTION_NAMES, ConfigError, config_from_options, resolve_device
from ..codec import FALLBACK_RULES, GRANULARITIES
from ..errors import CBDError
from ..fileio import OutputSet, escape_name, parse_positive_int
from ..format import compress_encoded, read, verify
from ..format.cbdfile import MAX_ARCH_ARG, check_fits
from ..zoo import load
from ..zoo.data import calibration_data, load_spec
from ..zoo.metrics import check_data_fits, evaluate
from ..zoo.models import build, known_archs, load_weights, torchvision_weights_file
from .export_cmd import add_export_parser, is_onnx, onnx_model
from .policy import finish, json_bytes, open_outputs
from .sweep_cmd import add_sweep_parser

__all__ = ["main", "build_parser"]


class UsageError(CBDError):
    pass


def _say(args, *text) -> None:
    if not args.quiet:  # with --json -, standard output is the JSON document alone: the text goes to stderr
        stream = sys.stderr if getattr(args, "json", None) == "-" else sys.stdout
        print(*text, flush=True, file=stream)


def _model_from_args(args) -> tuple[torch.nn.Module, str]:
    if args.arch is None:
        raise UsageError("--arch is required (known: " + ", ".join(known_archs()) + ")")
    kwargs = {} if getattr(args, "num_classes", None) is None else {"num_classes": args.num_classes}
    random_init = args.weights in (None, "random")
    if random_init:
        torch.manual_seed(args.seed)  # before the one build: its initialisation is the model's weights
    model = _build(args.arch, kwargs)
    if random_init:
        model.cbdnet_weights_source = f"random (seed {args.seed})"
        return model.eval(), model.cbdnet_weights_source
    if args.weights == "torchvision":
        path, label = torchvision_weights_file(args.arch)
        load_weights(model, path)
        model.cbdnet_weights_source = f"torchvision {label}"
        return model.eval(), f"torchvision {label} ({path})"
    load_weights(model, args.weights)
    return model.eval(), args.weights


def _build(arch: str, kwargs: dict) -> torch.nn.Module:
    try:
        return build(arch, allow_import=True, **kwargs)
    except TypeError as exc:
        raise UsageError(f"--num-classes does not apply to {arch}: {exc}") from None


def _evaluate(model, spec: str | None, args, data=None) -> dict | None:
    if not spec:
        return None
    data = load_spec(spec) if data is None else data
    try:
        return evaluate(model, data, batch_size=args.batch_size, progress=not args.quiet)
    except RuntimeError as exc:  # e.g. 8x8 grey digits into a CIFAR ResNet: the input's fault, not ours
        raise CBDError(f"the data {spec} does not fit the model: {_one_line(str(exc))}") from None


def _headline(result: dict) -> str:
    """The task's headline scores of an eval result, in one short string."""
    if "miou" in result:
        return f"mIoU {result['miou']:.4f}  pixel acc {result['pixel_acc']:.4f}"
    if "map50" in result:
        return f"mAP@0.5 {result['map50']:.4f}"
    return f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}"


_OPTION_ATTRS = {name: name.replace("-", "_") for name in OPTION_NAMES}


def _options(args) -> dict:
    """The ``compress`` options of the parsed flags, by option name (unset flags left out)."""
    return {name: getattr(args, attr) for name, attr in _OPTION_ATTRS.items() if getattr(args, attr) is not None}


def compress_config(args):
    """The config object of the ``compress`` flags; a flag that the chosen method would ignore is an error."""
    return config_from_options(_options(args), prefix="--")[0]


def calibration_settings(args, config) -> CalibrationConfig:
    """The calibration config of the flags; calibration flags without --calib, or GPTQ where no code uses it,
    are errors."""
    return config_from_options(_options(args), prefix="--")[1]


def _config_line(config, report) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k != "method")
    calib = report.config.get("calibration")
    return f"{config.method} ({fields})" + (f", calibrated on {report.extra['calibration']['spec']}"
                                            f" ({report.extra['calibration']['images']} images, "
                                            f"gptq={calib['gptq']})" if calib else "")


_FLAGS = {"images": "--calib-images", "target_bits": "--target-bits"}


def cmd_compress(args) -> int:
    try:  # before any work: a bad flag costs nothing
        config = compress_config(args)
        settings = calibration_settings(args, config)
        resolve_device(settings.device)  # CUDA asked for on a machine without it: refused before any work
    except ConfigError as exc:
        raise UsageError(f"{_FLAGS.get(exc.field, '--' + exc.field.replace('_', '-'))}: {exc}") from None
    out, (model_path, json_target) = open_outputs(args, [(args.output, "compressed model"),
                                                         (args.json, "JSON report")])
    with out:  # refused before any work; nothing is published before everything is staged
        _compress_run(args, config, settings, out, model_path, json_target)
    return 0


def _compress_run(args, config, settings, out: OutputSet, model_path, json_target) -> None:
    calib = calibration_data(args.calib) if args.calib else None  # the data first: cheap to refuse
    data = load_spec(args.data) if args.data else None
    model, source = _model_from_args(args)
    for spec, checked in ((args.calib, calib), (args.data, data)):
        if checked is not None:
            check_data_fits(model, checked, spec)
    before = _evaluate(model, args.data, args, data)
    model, report, encoded = compress_encoded(model, config, calibration=calib, calibration_config=settings,
                                              skip=args.skip or (), progress=not args.quiet, workers=args.workers,
                                              float32=args.float32, fold_bn=not args.no_fold_bn)
    report.extra.update({"arch": args.arch, "weights": source, "cbdnet_version": __version__})
    after = _evaluate(model, args.data, args, data)  # before writing: a failure here leaves any old output as it was
    if model_path is not None:  # the bytes compress measured (evaluation changes no weight or float tensor)
        out.write(model_path, encoded)
    if before is not None:
        report.extra.update({"data": args.data, "eval_before": before, "eval_after": after})
    finish(out, json_target, report.to_dict())  # every output published (or none) before the summary says so
    _say(args, f"cbdnet {__version__}: {escape_name(args.arch)} ({escape_name(source)}): "
               f"{_config_line(config, report)}")
    _say(args, report.table())
    if model_path is not None:
        _say(args, f"wrote {escape_name(args.output)}: {report.file_bytes:,} bytes = "
                   f"{report.file_bits_per_weight:.3f} bits per compressed weight "
                   f"(layers {report.coded_weight_bits / 8:,.0f} bytes) in {report.seconds:.1f} s")
    else:
        _say(args, "no -o given: nothing was written (pass -o FILE.cbd to save the compressed model)")
    if before is not None and "top1" in before:
        _say(args, f"top-1 before {before['top1']:.4f}  after {after['top1']:.4f}  "
                   f"(top-5 {before['top5']:.4f} -> {after['top5']:.4f}, n={after['n']})")
    elif before is not None:
        _say(args, f"before: {_headline(before)}  after: {_headline(after)}  (n={after['n']})")


def _skeleton(args) -> torch.nn.Module | None:
    if args.arch is None:
        return None
    kwargs = {} if getattr(args, "num_classes", None) is None else {"num_classes": args.num_classes}
    return _build(args.arch, kwargs)


def _refuse_set(args, names: tuple[str, ...], why: str) -> None:
    """A usage error naming every flag among ``names`` that the user set (their defaults are None)."""
    given = ["--" + name.replace("_", "-") for name in names if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply: {why}")


def cmd_eval(args) -> int:
    if not is_onnx(args.file):
        _refuse_set(args, ("threads",), "--threads is for .onnx files (ONNX Runtime)")
    elif args.file:
        _refuse_set(args, ("arch", "weights", "num_classes"), "an .onnx file holds its model")
    if args.file and not is_onnx(args.file) and args.weights is not None:
        raise UsageError("--weights does not apply to a .cbd file (its weights are in the file)")
    out, (json_target,) = open_outputs(args, [(args.json, "JSON report")])
    with out:
        data = load_spec(args.data)  # the data first: cheap to refuse
        if is_onnx(args.file):
            model, source = onnx_model(args.file, args.threads), args.file
        elif args.file:
            model, source = load(args.file, _skeleton(args)), args.file
        else:
            model, source = _model_from_args(args)
        check_data_fits(model, data, args.data)
        start = time.perf_counter()
        result = _evaluate(model, args.data, args, data)
        result.update({"model": source, "data": args.data, "seconds": time.perf_counter() - start})
        _say(args, f"{escape_name(source)} on {escape_name(args.data)}: {_headline(result)}  (n={result['n']})")
        finish(out, json_target, result)
    return 0


def _info_dict(path: str, parsed) -> dict:
    """What ``info`` prints: per layer the planes as the file holds them, the paper's fixed-length count
    (``bits``, as ``compress`` reported it) and what the file spends on them (``coded_bits``: entropy-coded in
    format 2; the same as ``bits`` in format 1), and the whole file per compressed weight (``parsed``: the
    file as :func:`read` returned it)."""
    version = parsed.meta.get("format_version")
    coded = (lambda c: c.bits()) if version == 1 else (lambda c: c.coded_bits())
    paper = {layer["name"]: layer.get("paper_bits") for layer in parsed.meta["layers"]}  # format 2 records it
    bits = {name: paper.get(name) or code.bits() for name, code in parsed.codes.items()}
    layers = []
    for name, code in parsed.codes.items():
        layers.append({"name": name, "shape": list(code.shape), "mode": code.mode, "planes": code.num_planes,
                       "exponents": list(code.exponents), "bits": bits[name],
                       "bits_per_weight": bits[name] / code.numel, "coded_bits": coded(code),
                       "coded_bits_per_weight": coded(code) / code.numel,
                       "coding": "fixed" if version == 1 else code.stream().coding,
                       "wmax": code.wmax, "a": code.scale,
                       "step": code.step,
                       "plane_storage": [p.storage for p in code.planes], "plane_ranks": [p.rank for p in code.planes]})
    params = sum(c.numel for c in parsed.codes.values())
    return {"file": path, "file_bytes": parsed.size, "format_version": version,
            "arch": parsed.meta.get("arch"), "cbdnet_version": parsed.meta.get("cbdnet_version"),
            "extra": parsed.meta.get("extra", {}), "params": params,
            "bits_per_weight": sum(bits.values()) / params,
            "coded_bits_per_weight": sum(coded(c) for c in parsed.codes.values()) / params,
            "file_bits_per_weight": 8 * parsed.size / params,
            "float_tensors": len(parsed.floats), "layers": layers}


def cmd_info(args) -> int:
    parsed = read(args.file)
    info = _info_dict(args.file, parsed)
    if args.arch is not None:
        with torch.device("meta"):
            check_fits(_skeleton(args), parsed)
        info["fits_arch"] = args.arch
    if args.verify:
        problems = verify(args.file, parsed)
        info["verify"] = {"ok": not problems, "problems": problems}
    if args.json:
        sys.stdout.write(json_bytes(info).decode())
    else:
        _say(args, f"{escape_name(info['file'])}: .cbd format v{info['format_version']}, "
                   f"arch {escape_name(info['arch'])}, "
                   f"{info['file_bytes']:,} bytes, {len(info['layers'])} compressed layers, "
                   f"{info['params']:,} weights at {info['bits_per_weight']:.3f} bits/weight, entropy-coded "
                   f"{info['coded_bits_per_weight']:.3f}, whole file {info['file_bits_per_weight']:.3f}")
        for layer in info["layers"]:
            storage = "".join("F" if s == "factored" else "p" for s in layer["plane_storage"])
            shape = "x".join(map(str, layer["shape"]))
            _say(args, f"  {escape_name(layer['name']):<28} {shape:<16} {layer['mode']:<7} "
                       f"planes {storage:<8} ranks {layer['plane_ranks']} {layer['bits_per_weight']:.3f} b/w, "
                       f"{layer['coding']} {layer['coded_bits_per_weight']:.3f}")
        if args.verify:
            status = "OK: checksum and every plane verified" if not problems else "FAILED"
            _say(args, f"verify: {status}")
    for problem in info.get("verify", {}).get("problems", []):  # at most one line per layer, names escaped
        print(f"cbdnet: verify: {escape_name(problem, max_len=400)}", file=sys.stderr)
    return 0 if not info.get("verify") or info["verify"]["ok"] else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out_dir, quiet=args.quiet, seed=args.seed, force=args.force)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cbdnet", description="Compress pretrained CNNs by composite binary "
                     "decomposition (CBDNet), without retraining.")
    parser.add_argument("--version", action="version", version=f"cbdnet {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--arch", help="architecture: " + ", ".join(known_archs()) + ", torchvision:NAME (any "
                       "torchvision classification or segmentation model) or module.path:factory (your own code)")
        p.add_argument("--weights", help="checkpoint (state dict) path, 'random' (seeded), or 'torchvision' (the "
                       "default torchvision weights of resnet18/vgg16/densenet121/ssd300 from torch's local cache; "
                       "never downloaded)")
        p.add_argument("--seed", type=_bounded("--seed", 0, MAX_SEED), default=0, help="seed for --weights random")
        p.add_argument("--batch-size", type=_bounded("--batch-size", 1, MAX_BATCH), default=500)
        p.add_argument("--num-classes", type=_bounded("--num-classes", 1, MAX_ARCH_ARG), default=None,
                       help="class count of the checkpoint's head (e.g. 21 for a VOC-trained ssd300; default: the "
                            "architecture's own: 1000 ImageNet, 91 COCO for ssd300, 11 CamVid for segnet)")

    p = sub.add_parser("compress", parents=[common], help="compress a model to a .cbd file")
    model_args(p)
    p.add_argument("--planes", "-J", type=int, default=None, help="bit planes J (default 5)")
    p.add_argument("--bottleneck", "-b", type=float, default=None, help="rank bound / min(h, w) (default 0.3)")
    p.add_argument("--method", choices=("cbd", "uniform", "rtn"), default=None,
                   help="cbd (composite planes + GF(2) factors), uniform (plain J-bit code, the baseline) or "
                        "rtn (K-bit symmetric round-to-nearest, sign included, the usual baseline)")
    p.add_argument("--fallback", choices=FALLBACK_RULES, default=None,
                   help="when a layer's composite code is replaced by the uniform J-plane code: 'distortion' "
                        "(default: where its squared error x 4^(bits/weight) is higher) or 'size' (the paper: only "
                        "where it takes no fewer bits)")
    _method_args(p)
    p.add_argument("--skip", nargs="*", help="layer names to keep in float")
    p.add_argument("--workers", type=_bounded("--workers", 1, 256), default=None,
                   help="layers encoded at once in threads (default 1, or $CBDNET_WORKERS); same result")
    p.add_argument("--data", help="evaluate before and after on this data spec, e.g. cifar10-npz:PATH")
    p.add_argument("-o", "--output", help="output .cbd file")
    p.add_argument("--json", help="write the report as JSON here ('-': standard output)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--no-fold-bn", action="store_true",
                   help="keep each BatchNorm as it is instead of folding it into the per-channel steps of the "
                        "layer before it (the file then stores its scale, mean and variance too)")
    p.add_argument("--float32", action="store_true",
                   help="keep float tensors (BatchNorm, biases) at their own precision instead of rounding them to "
                        "float16 where float16 is precise enough (the file stores what the model holds)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", parents=[common], help="accuracy of a .cbd file or a float model")
    p.add_argument("file", nargs="?", help=".cbd or .onnx file (or give --arch/--weights)")
    model_args(p)
    p.add_argument("--threads", type=int, default=None, help=".onnx: ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--data", required=True, help="data spec, e.g. cifar10-npz:PATH")
    p.add_argument("--json", help="write the result as JSON here ('-': standard output)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(func=cmd_eval)

    add_export_parser(sub, common)

    p = sub.add_parser("info", parents=[common], help="show (and --verify) a .cbd file")
    p.add_argument("file")
    p.add_argument("--arch", help="check that the file fits this architecture (registered, torchvision:NAME or "
                                  "module.path:factory)")
    p.add_argument("--num-classes", type=_bounded("--num-classes", 1, MAX_ARCH_ARG), default=None,
                   help="class count of the architecture's head")
    p.add_argument("--verify", action="store_true", help="re-check every checksum and factorisation")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    add_sweep_parser(sub, common)

    p = sub.add_parser("demo", parents=[common], help="train a small CNN on digits, compress it, report")
    p.add_argument("--out-dir", default=None, help="where to write the demo's .cbd files (default: a temp dir)")
    p.add_argument("--seed", type=_bounded("--seed", 0, MAX_SEED), default=0)
    p.add_argument("--force", action="store_true", help="overwrite the demo's existing .cbd files in --out-dir")
    p.set_defaults(func=cmd_demo)
    return parser


def _method_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=int, default=None,
                        help="--method rtn: bits per weight K, sign included (2^(K-1)-1 levels per side; default 4)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default=None,
                        help="one scale per output channel or per tensor (default: channel for rtn, tensor "
                             "for cbd, i.e. the paper's code)")
    parser.add_argument("--calib", help="calibration data spec (training images only), e.g. "
                                        "cifar10-npz:../shared/data/cifar10_calib1000.npz")
    parser.add_argument("--calib-images", type=int, default=None, help="use only the first N calibration images")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="with --calib: where the forward/backward passes, statistics and refit run: cpu "
                             "(default), cuda, cuda:N or auto (CUDA where available); the codes are the same")
    parser.add_argument("--target-bits", type=float, default=None,
                        help="choose per-layer settings to fit X bits/weight (as stored), by predicted --calib loss "
                             "(without --calib: by weight squared error)")
    parser.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                        help="with --calib: error-compensating rounding (GPTQ) instead of round-to-nearest "
                             "(default on; rtn per channel and --target-bits)")
    parser.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                        help="with --calib: remove each layer's mean output shift (default: kept where it "
                             "lowers the calibration loss)")
    parser.add_argument("--bn-reestimate", action=argparse.BooleanOptionalAction, default=None,
                        help="with --calib: recompute BatchNorm statistics on the calibration images (default off)")
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                        help="with --calib: after the codes are chosen, round each GPTQ grid again on the compressed "
                             "model so far, against the float layer's output (default on; rtn per channel and "
                             "--target-bits)")
    parser.add_argument("--adaround", type=_bounded("--adaround", 0, 1_000_000), default=None, metavar="STEPS",
                        help="with --calib and --target-bits or --method rtn: learn each block's rounding for STEPS "
                             "optimiser steps after the codes are chosen (AdaRound/BRECQ; 2000 measured; 0: off, "
                             "the default)")


MAX_SEED = 2**63 - 1
MAX_BATCH = 1 << 20


def _bounded(flag: str, low: int, high: int):
    """An argparse type: a whole number in ``[low, high]`` (a usage error, exit 2, naming the flag otherwise)."""
    def parse(text: str) -> int:
        try:
            return parse_positive_int(text, name=flag, low=low, high=high)
        except CBDError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = flag
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " / ".join(lines)[:500] if lines else "(no message)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed one usage line
        return int(exc.code or 0) if exc.code in (0, None) else 2
    try:
        with torch.no_grad():  # nothing here trains except the demo, which enables grad itself
            return args.func(args)
    except CBDError as exc:
        if args.debug:
            raise
        print(f"cbdnet: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cbdnet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line, the traceback only with --debug
        if args.debug:
            raise
        print(f"cbdnet: internal error: {type(exc).__name__}: {_one_line(str(exc))} (rerun with --debug for the "
              f"traceback; python {platform.python_version()}, torch {torch.__version__})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
