"""The ``cbdnet`` command line: ``compress``, ``eval``, ``info`` and ``demo``.

Every failure ends in one line on stderr: exit code 2 for bad input or usage, 1 for an internal error;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from typing import NoReturn

import torch

from .. import __version__
from ..calib import BudgetConfig, CalibrationConfig, CBDConfig, RTNConfig, UniformConfig, compress
from ..calib.configs import ConfigError
from ..codec import FALLBACK_RULES, GRANULARITIES
from ..errors import CBDError
from ..format import atomic_write, check_writable, encode_file, read, save, verify
from ..format.cbdfile import check_fits
from ..zoo import load
from ..zoo.data import calibration_data, load_spec
from ..zoo.metrics import evaluate_classification, evaluate_detection, evaluate_segmentation
from ..zoo.models import build, known_archs, load_weights, torchvision_weights_file

__all__ = ["main", "build_parser"]


class UsageError(CBDError):
    pass


def _say(args, *text) -> None:
    if not args.quiet:
        print(*text, flush=True)


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        atomic_write(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


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


def _evaluate(model, spec: str | None, args) -> dict | None:
    if not spec:
        return None
    data = load_spec(spec)
    task = getattr(data, "task", "classification")
    try:
        if task == "segmentation":
            return evaluate_segmentation(model, data, batch_size=min(args.batch_size, 8), progress=not args.quiet)
        if task == "detection":
            return evaluate_detection(model, data, batch_size=min(args.batch_size, 8), progress=not args.quiet)
        return evaluate_classification(model, data, batch_size=args.batch_size, progress=not args.quiet)
    except RuntimeError as exc:  # e.g. 8x8 grey digits into a CIFAR ResNet: the input's fault, not ours
        raise CBDError(f"the data {spec} does not fit the model: {_one_line(str(exc))}") from None


def _headline(result: dict) -> str:
    """The task's headline scores of an eval result, in one short string."""
    if "miou" in result:
        return f"mIoU {result['miou']:.4f}  pixel acc {result['pixel_acc']:.4f}"
    if "map50" in result:
        return f"mAP@0.5 {result['map50']:.4f}"
    return f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}"


def _given(args, *names: str) -> list[str]:
    """The flags among ``names`` that the user set (their defaults are None)."""
    return ["--" + name.replace("_", "-") for name in names if getattr(args, name) is not None]


def _refuse(given: list[str], why: str) -> None:
    if given:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply: {why}")


def compress_config(args):
    """The config object of the ``compress`` flags; a flag that the chosen method would ignore is an error."""
    if args.target_bits is not None:
        _refuse(_given(args, "method", "bits", "planes", "bottleneck", "fallback", "granularity"),
                "--target-bits chooses every layer's code itself")
        return BudgetConfig(target_bits=args.target_bits)
    method = args.method or "cbd"
    if method == "rtn":
        _refuse(_given(args, "planes", "bottleneck", "fallback"), "--method rtn takes --bits and --granularity")
        return RTNConfig(bits=4 if args.bits is None else args.bits, granularity=args.granularity or "channel")
    _refuse(_given(args, "bits"), f"--bits is for --method rtn; --method {method} takes --planes")
    planes = 5 if args.planes is None else args.planes
    if method == "uniform":
        _refuse(_given(args, "bottleneck", "fallback"), "--method uniform has no scale search")
        if args.granularity == "channel":
            raise UsageError("--granularity channel is not available for --method uniform")
        return UniformConfig(planes=planes)
    return CBDConfig(planes=planes, bottleneck=0.3 if args.bottleneck is None else args.bottleneck,
                     fallback=args.fallback, granularity=args.granularity or "tensor")


def calibration_settings(args, config) -> CalibrationConfig:
    """The calibration config of the flags; calibration flags without --calib, or GPTQ where no code uses it,
    are errors."""
    if not args.calib:
        _refuse(_given(args, "calib_images", "gptq", "bias_correction", "bn_reestimate"), "they need --calib")
        return CalibrationConfig()
    gptq_used = isinstance(config, BudgetConfig) or isinstance(config, RTNConfig) and config.granularity == "channel"
    if args.gptq is not None and not gptq_used:
        raise UsageError("--gptq/--no-gptq apply to --method rtn per channel and --target-bits only")
    return CalibrationConfig(images=args.calib_images, gptq=True if args.gptq is None else args.gptq,
                             bias_correction="auto" if args.bias_correction is None else args.bias_correction,
                             bn_reestimate=False if args.bn_reestimate is None else args.bn_reestimate)


def _config_line(config, report) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k != "method")
    calib = report.config.get("calibration")
    return f"{config.method} ({fields})" + (f", calibrated on {report.extra['calibration']['spec']}"
                                            f" ({report.extra['calibration']['images']} images, "
                                            f"gptq={calib['gptq']})" if calib else "")


_FLAGS = {"images": "--calib-images", "target_bits": "--target-bits"}


def _compress_within_budget(args, model, config, calib, settings):
    """``compress``; under ``--target-bits`` the whole file (as ``save`` writes it) must fit the budget: where
    the budget's header allowance was too small, tighten the target by the excess and compress again."""
    target = config
    for attempt in range(3):
        model, report = compress(model, target, calibration=calib, calibration_config=settings,
                                 skip=args.skip or (), progress=not args.quiet, workers=args.workers,
                                 float32=args.float32)
        if not isinstance(config, BudgetConfig):
            return model, report
        excess = 8 * len(encode_file(model, float32=args.float32)) - config.target_bits * report.params
        report.extra["budget_retries"] = attempt
        if excess <= 0:
            return model, report
        target = dataclasses.replace(target, target_bits=target.target_bits - excess / report.params - 1e-3)
        model, _ = _model_from_args(args)
    raise CBDError(f"--target-bits {config.target_bits}: the file does not fit after {attempt + 1} tries")


def cmd_compress(args) -> int:
    try:  # before any work: a bad flag costs nothing
        config = compress_config(args)
        settings = calibration_settings(args, config)
    except ConfigError as exc:
        raise UsageError(f"{_FLAGS.get(exc.field, '--' + exc.field.replace('_', '-'))}: {exc}") from None
    if args.output:  # refuse before any work; the file itself is only replaced at the very end
        check_writable(args.output, overwrite=args.force)
    if args.json:
        check_writable(args.json)
    calib = calibration_data(args.calib) if args.calib else None
    model, source = _model_from_args(args)
    before = _evaluate(model, args.data, args)
    model, report = _compress_within_budget(args, model, config, calib, settings)
    report.extra.update({"arch": args.arch, "weights": source, "cbdnet_version": __version__})
    after = _evaluate(model, args.data, args)  # before writing: a failure here leaves any old output as it was
    if args.output:
        report.file_bytes = save(model, args.output, overwrite=True, float32=args.float32)
    if before is not None:
        report.extra.update({"data": args.data, "eval_before": before, "eval_after": after})
    _say(args, f"cbdnet {__version__}: {args.arch} ({source}): {_config_line(config, report)}")
    _say(args, report.table())
    if report.file_bytes is not None:
        _say(args, f"wrote {args.output}: {report.file_bytes:,} bytes = {report.file_bits_per_weight:.3f} bits per "
                   f"compressed weight (layers {report.weight_bits / 8:,.0f} bytes) in {report.seconds:.1f} s")
    else:
        _say(args, "no -o given: nothing was written (pass -o FILE.cbd to save the compressed model)")
    if before is not None and "top1" in before:
        _say(args, f"top-1 before {before['top1']:.4f}  after {after['top1']:.4f}  "
                   f"(top-5 {before['top5']:.4f} -> {after['top5']:.4f}, n={after['n']})")
    elif before is not None:
        _say(args, f"before: {_headline(before)}  after: {_headline(after)}  (n={after['n']})")
    _write_json(args.json, report.to_dict())
    return 0


def _skeleton(args) -> torch.nn.Module | None:
    if args.arch is None:
        return None
    kwargs = {} if getattr(args, "num_classes", None) is None else {"num_classes": args.num_classes}
    return _build(args.arch, kwargs)


def cmd_eval(args) -> int:
    if args.json:
        check_writable(args.json)
    if args.file:
        if args.weights is not None:
            raise UsageError("--weights does not apply to a .cbd file (its weights are in the file)")
        model, source = load(args.file, _skeleton(args)), args.file
    else:
        model, source = _model_from_args(args)
    start = time.perf_counter()
    result = _evaluate(model, args.data, args)
    result.update({"model": source, "data": args.data, "seconds": time.perf_counter() - start})
    _say(args, f"{source} on {args.data}: {_headline(result)}  (n={result['n']})")
    _write_json(args.json, result)
    return 0


def _info_dict(path: str) -> dict:
    parsed = read(path)
    layers = []
    stored = (lambda c: c.bits()) if parsed.meta.get("format_version") == 1 else (lambda c: c.coded_bits())
    for name, code in parsed.codes.items():
        layers.append({"name": name, "shape": list(code.shape), "mode": code.mode, "planes": code.num_planes,
                       "exponents": list(code.exponents), "bits": stored(code),
                       "bits_per_weight": stored(code) / code.numel,
                       "coding": "fixed" if parsed.meta.get("format_version") == 1 else code.stream().coding,
                       "wmax": code.wmax, "a": code.scale,
                       "step": code.step,
                       "plane_storage": [p.storage for p in code.planes], "plane_ranks": [p.rank for p in code.planes]})
    params = sum(c.numel for c in parsed.codes.values())
    bits = sum(stored(c) for c in parsed.codes.values())
    return {"file": path, "file_bytes": parsed.size, "format_version": parsed.meta.get("format_version"),
            "arch": parsed.meta.get("arch"), "cbdnet_version": parsed.meta.get("cbdnet_version"),
            "extra": parsed.meta.get("extra", {}), "params": params, "bits_per_weight": bits / params,
            "file_bits_per_weight": 8 * parsed.size / params,
            "float_tensors": len(parsed.floats), "layers": layers}


def cmd_info(args) -> int:
    info = _info_dict(args.file)
    if args.arch is not None:
        with torch.device("meta"):
            check_fits(_skeleton(args), read(args.file))
        info["fits_arch"] = args.arch
    if args.verify:
        problems = verify(args.file)
        info["verify"] = {"ok": not problems, "problems": problems}
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        _say(args, f"{info['file']}: .cbd format v{info['format_version']}, arch {info['arch']}, "
                   f"{info['file_bytes']:,} bytes, {len(info['layers'])} compressed layers, "
                   f"{info['params']:,} weights at {info['bits_per_weight']:.3f} bits/weight "
                   f"(whole file {info['file_bits_per_weight']:.3f})")
        for layer in info["layers"]:
            storage = "".join("F" if s == "factored" else "p" for s in layer["plane_storage"])
            _say(args, f"  {layer['name']:<28} {'x'.join(map(str, layer['shape'])):<16} {layer['mode']:<7} "
                       f"planes {storage:<8} ranks {layer['plane_ranks']} {layer['coding']:<7} "
                       f"{layer['bits_per_weight']:.3f} b/w")
        if args.verify:
            status = "OK: checksum and every plane verified" if not problems else "FAILED"
            _say(args, f"verify: {status}")
    for problem in info.get("verify", {}).get("problems", []):
        print(f"cbdnet: verify: {problem}", file=sys.stderr)
    return 0 if not info.get("verify") or info["verify"]["ok"] else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out_dir, quiet=args.quiet, seed=args.seed)
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
        p.add_argument("--seed", type=int, default=0, help="seed for --weights random")
        p.add_argument("--batch-size", type=int, default=500)
        p.add_argument("--num-classes", type=int, default=None,
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
    p.add_argument("--workers", type=int, default=None,
                   help="layers encoded at once in threads (default 1, or $CBDNET_WORKERS); same result")
    p.add_argument("--data", help="evaluate before and after on this data spec, e.g. cifar10-npz:PATH")
    p.add_argument("-o", "--output", help="output .cbd file")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--float32", action="store_true",
                   help="store float tensors (BatchNorm, biases) as float32 instead of float16 where exact enough")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", parents=[common], help="accuracy of a .cbd file or a float model")
    p.add_argument("file", nargs="?", help=".cbd file (or give --arch/--weights)")
    model_args(p)
    p.add_argument("--data", required=True, help="data spec, e.g. cifar10-npz:PATH")
    p.add_argument("--json", help="write the result as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", parents=[common], help="show (and --verify) a .cbd file")
    p.add_argument("file")
    p.add_argument("--arch", help="check that the file fits this architecture (registered, torchvision:NAME or "
                                  "module.path:factory)")
    p.add_argument("--num-classes", type=int, default=None, help="class count of the architecture's head")
    p.add_argument("--verify", action="store_true", help="re-check every checksum and factorisation")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", parents=[common], help="train a small CNN on digits, compress it, report")
    p.add_argument("--out-dir", default=None, help="where to write the demo's .cbd files (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
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
