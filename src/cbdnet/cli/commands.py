"""The ``cbdnet`` command line: ``compress``, ``eval``, ``export``, ``info``, ``sweep`` and ``demo``.

Every failure ends in one line on stderr: exit code 2 for bad input or usage, 1 for an internal error;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
import warnings

import torch

from .._version import __version__
from ..calib import CalibrationConfig
from ..calib.configs import OPTION_NAMES, ConfigError, config_from_options, resolve_device
from ..errors import CBDError, FormatError
from ..fileio import OutputSet, escape_name
from ..format import compress_encoded, read, verify
from ..format.cbdfile import check_fits
from ..nn.report import layer_table, plane_coding, totals_lines
from ..nn.state import record
from ..zoo import load
from ..zoo.data import calibration_data, load_spec
from ..zoo.metrics import check_data_fits, evaluate
from ..zoo.models import build, known_archs, load_weights, torchvision_weights_file
from .export_cmd import is_onnx, onnx_model
from .parser import build_parser, one_line
from .policy import finish, open_outputs, stdout_closed

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
        source = f"random (seed {args.seed})"
        record(model, weights_source=source)
        return model.eval(), source
    if args.weights == "torchvision":
        path, label = torchvision_weights_file(args.arch)
        load_weights(model, path)
        record(model, weights_source=f"torchvision {label}")
        return model.eval(), f"torchvision {label} ({path})"
    load_weights(model, args.weights)
    return model.eval(), args.weights


def _build(arch: str, kwargs: dict) -> torch.nn.Module:
    try:
        return build(arch, allow_import=True, **kwargs)
    except TypeError as exc:
        raise UsageError(f"--num-classes does not apply to {arch}: {exc}") from None


def _evaluate(model, spec: str | None, args, data=None) -> dict | None:
    """The scores on ``spec`` (None: no data given, nothing evaluated)."""
    return _scores(model, spec, args, data) if spec else None


def _scores(model, spec: str, args, data=None) -> dict:
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
    if before is not None and after is not None:  # both or neither: --data given or not
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
    if before is not None and after is not None:
        _say(args, _before_after(before, after))


def _before_after(before: dict, after: dict) -> str:
    if "top1" in before:
        return (f"top-1 before {before['top1']:.4f}  after {after['top1']:.4f}  "
                f"(top-5 {before['top5']:.4f} -> {after['top5']:.4f}, n={after['n']})")
    return f"before: {_headline(before)}  after: {_headline(after)}  (n={after['n']})"


def _skeleton(args) -> torch.nn.Module | None:
    return None if args.arch is None else _arch_model(args)


def _arch_model(args) -> torch.nn.Module:
    """A fresh model of ``--arch`` (and ``--num-classes``), which the caller checked was given."""
    kwargs = {} if getattr(args, "num_classes", None) is None else {"num_classes": args.num_classes}
    return _build(args.arch, kwargs)


def _refuse_set(args, names: tuple[str, ...], why: str) -> None:
    """A usage error naming every flag among ``names`` that the user set (their defaults are None)."""
    given = ["--" + name.replace("_", "-") for name in names if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply: {why}")


@contextlib.contextmanager
def reading_cbd(path: str, hint: str = ""):
    """A :class:`FormatError` of reading ``path`` names the file; where the file is no .cbd file at all, the
    message ends with ``hint`` (what the user most likely meant, e.g. a checkpoint for ``--weights``)."""
    try:
        yield
    except FormatError as exc:
        text = _one_line(str(exc))
        not_cbd = text.startswith("not a .cbd file")
        raise FormatError(f"{escape_name(path)}: {text}" + (f"; {hint}" if not_cbd and hint else "")) from None


def checkpoint_hint(path: str, command: str) -> str:
    name = escape_name(path)
    if command == "eval":
        return f"for a checkpoint (state dict) give --arch NAME --weights {name} instead"
    return (f"if it is a checkpoint (state dict), make a .cbd file first: cbdnet compress --arch NAME --weights "
            f"{name} -o OUT.cbd")


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
        model: torch.nn.Module
        if is_onnx(args.file):
            model, source = onnx_model(args.file, args.threads), args.file
        elif args.file:
            with reading_cbd(args.file, checkpoint_hint(args.file, "eval")):
                model, source = load(args.file, _skeleton(args)), args.file
        else:
            model, source = _model_from_args(args)
        check_data_fits(model, data, args.data)
        start = time.perf_counter()
        result = _scores(model, args.data, args, data)
        result.update({"model": source, "data": args.data, "seconds": time.perf_counter() - start})
        _say(args, f"{escape_name(source)} on {escape_name(args.data)}: {_headline(result)}  (n={result['n']})")
        finish(out, json_target, result)
    return 0


def _info_dict(path: str, parsed) -> dict:
    """What ``info`` prints: per layer the planes as the file holds them, the paper's fixed-length count
    (``bits``, as ``compress`` reported it) and what the file spends on them (``coded_bits``: entropy-coded in
    format 2; the same as ``bits`` in format 1), the fields of ``compress``'s table (``code``, ``h``, ``w``,
    ``scale``, ``plane_coding``), and the whole file per compressed weight (``parsed``: the file as
    :func:`read` returned it)."""
    version = parsed.meta.get("format_version")
    coded = (lambda c: c.bits()) if version == 1 else (lambda c: c.coded_bits())
    paper = {layer["name"]: layer.get("paper_bits") for layer in parsed.meta["layers"]}  # format 2 records it
    bits = {name: paper.get(name) or code.bits() for name, code in parsed.codes.items()}
    layers = []
    for name, code in parsed.codes.items():
        h, w = code.matrix_shape
        layers.append({"name": name, "shape": list(code.shape), "mode": code.mode, "planes": code.num_planes,
                       "exponents": list(code.exponents), "bits": bits[name],
                       "bits_per_weight": bits[name] / code.numel, "coded_bits": coded(code),
                       "coded_bits_per_weight": coded(code) / code.numel,
                       "coding": "fixed" if version == 1 else code.stream().coding,
                       "wmax": code.wmax, "a": code.scale, "scale": code.scale, "code": code.label, "h": h, "w": w,
                       "plane_coding": [] if version == 1 else plane_coding(code), "reason": code.reason,
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


def _info_text(args, info: dict) -> None:
    """``info`` as text: the whole file's bits per weight first, then the table ``compress`` printed."""
    _say(args, f"{escape_name(info['file'])}: {info['file_bits_per_weight']:.3f} bits/weight for the whole file "
               f"({info['file_bytes']:,} bytes), .cbd format v{info['format_version']}, "
               f"arch {escape_name(info['arch'])}, {len(info['layers'])} compressed layers")
    rows = [{**layer, "name": escape_name(layer["name"]), "planes": len(layer["plane_storage"]),
             "code": escape_name(layer["code"]), "rel_error": None} for layer in info["layers"]]
    _say(args, "\n".join(layer_table(rows) + totals_lines(
        info["file_bytes"], info["params"], info["coded_bits_per_weight"], info["bits_per_weight"],
        len(info["layers"]), None)))


def cmd_info(args) -> int:
    if args.file is None and args.json not in (None, "-"):  # `info --json FILE.cbd`, as before --json took a path
        args.file, args.json = args.json, "-"
    if args.file is None:
        raise UsageError("the following arguments are required: file (the .cbd file to show; see cbdnet info --help)")
    out, (json_target,) = open_outputs(args, [(args.json, "JSON report")])
    with out:
        with reading_cbd(args.file, checkpoint_hint(args.file, "info")):
            parsed = read(args.file, decode=False)  # format 2: header, sizes, scales; --verify decodes layer by layer
        info = _info_dict(args.file, parsed)
        if args.arch is not None:
            with torch.device("meta"):
                check_fits(_arch_model(args), parsed)
            info["fits_arch"] = args.arch
        if args.verify:
            problems = verify(args.file, parsed)
            info["verify"] = {"ok": not problems, "problems": problems}
        if args.json is None:
            _info_text(args, info)
            if args.verify:
                _say(args, f"verify: {'OK: checksum and every plane verified' if not problems else 'FAILED'}")
        finish(out, json_target, info)
    for problem in info.get("verify", {}).get("problems", []):  # at most one line per layer, names escaped
        print(f"cbdnet: verify: {escape_name(problem, max_len=400)}", file=sys.stderr)
    return 0 if not info.get("verify") or info["verify"]["ok"] else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out_dir, quiet=args.quiet, seed=args.seed, force=args.force, plot=args.plot)
    return 0


_one_line = one_line  # the name main() and the commands use


EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader (``head``) went away


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed one usage line
        return int(exc.code or 0) if exc.code in (0, None) else 2
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # library warnings: shown once, or in the error line
            warnings.simplefilter("default")
            return _run(args, caught)
    finally:  # outside the recording: inside it, showing a warning recorded it again, without end
        _show(caught)


def _run(args, caught: list) -> int:
    try:
        with torch.no_grad():  # nothing here trains except the demo, which enables grad itself
            code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not as a message at interpreter exit
        return code
    except BrokenPipeError as exc:
        if stdout_closed():  # standard output's reader went away (``| head -1``, ``| true``): end quietly
            return _stdout_gone()
        return _internal_error(args, exc, caught)
    except CBDError as exc:
        if args.debug:
            raise
        print(f"cbdnet: error: {_one_line(str(exc))}{_warned(caught)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cbdnet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line, the traceback only with --debug
        return _internal_error(args, exc, caught)


def _internal_error(args, exc: Exception, caught: list) -> int:
    if args.debug:
        raise exc
    print(f"cbdnet: internal error: {type(exc).__name__}: {_one_line(str(exc))}{_warned(caught)} (rerun with "
          f"--debug for the traceback; python {platform.python_version()}, torch {torch.__version__})",
          file=sys.stderr)
    return 1


def _stdout_gone() -> int:
    """Point standard output at /dev/null (so that Python's flush at exit says nothing) and return 141."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_PIPE


def _warned(caught: list) -> str:
    """The warnings a failed run caught, as part of its one error line (then not shown again)."""
    texts = list(dict.fromkeys(_one_line(str(w.message))[:200] for w in caught))
    caught.clear()
    return f" (warning: {'; '.join(texts[:2])})" if texts else ""


def _show(caught: list) -> None:
    """Warnings of a run that did not fail: shown once each, as Python would have."""
    for item in list(caught):
        with contextlib.suppress(OSError, ValueError):
            warnings.showwarning(item.message, item.category, item.filename, item.lineno)


if __name__ == "__main__":
    sys.exit(main())
