"""``cbdnet export IN.cbd --format onnx -o OUT.onnx [--int8 --calib SPEC]`` and the ONNX side of ``cbdnet eval``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from .._version import __version__
from ..errors import CBDError
from ..export import OnnxModel, export_onnx_bytes
from ..format import read
from ..zoo import input_spec, load
from ..zoo.data import calibration_data
from ..zoo.models import build
from .policy import finish, open_outputs

__all__ = ["cmd_export", "is_onnx", "onnx_model", "default_output"]


def is_onnx(path: str | None) -> bool:
    return bool(path) and str(path).lower().endswith(".onnx")


def onnx_model(path: str, threads: int | None) -> OnnxModel:
    """The ONNX file as a module-like model for the zoo's metrics (ONNX Runtime, ``threads`` threads, 1 default)."""
    return OnnxModel(path, 1 if threads is None else threads)


def _input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise CBDError(f"--input-shape must be positive integers such as 1,3,32,32, got {text!r}")
    return shape


def _calibration(spec: str, images: int | None) -> Iterator[torch.Tensor]:
    """Normalised image batches of a calibration spec (training images only), the first ``images`` of them."""
    data = calibration_data(spec)
    left = len(data) if images is None else min(images, len(data))
    size = 8 if getattr(data, "task", "classification") == "segmentation" else 100
    for batch, _ in data.batches(size):
        if left <= 0:
            return
        yield batch[:left]
        left -= len(batch)


def _metadata(parsed, arch: str, spec, args) -> dict[str, str]:
    config = (parsed.meta.get("extra") or {}).get("config")
    return {"cbdnet.arch": arch, "cbdnet.task": spec.task, "cbdnet.input_shape": json.dumps(list(spec.shape)),
            "cbdnet.input_mean": json.dumps(list(spec.mean)), "cbdnet.input_std": json.dumps(list(spec.std)),
            "cbdnet.version": __version__, "cbdnet.cbd_version": str(parsed.meta.get("cbdnet_version")),
            "cbdnet.config": json.dumps(config, sort_keys=True),
            "cbdnet.int8_activations": json.dumps(bool(args.int8)),
            "cbdnet.calibration": json.dumps({"spec": args.calib, "images": args.calib_images,
                                                       "method": args.calib_method} if args.int8 else None)}


def default_output(path: str) -> str:
    """Where ``export FILE`` writes without ``-o``: FILE's name with ``.onnx``, beside it (``r20.cbd`` ->
    ``r20.onnx``); an existing file there is replaced only with ``--force``, as every output."""
    return str(Path(path).with_suffix(".onnx"))


def cmd_export(args) -> int:
    from .commands import checkpoint_hint, reading_cbd  # commands imports this module

    if args.output is None:
        args.output = default_output(args.file)
    if args.int8 and not args.calib:
        raise CBDError("--int8 needs --calib SPEC (training images to calibrate the activation ranges)")
    if not args.int8 and (args.calib or args.calib_images is not None or args.calib_method != "mse"):
        raise CBDError("--calib/--calib-images/--calib-method apply to --int8 only (weight-only export needs no "
                       "calibration)")
    if args.calib_images is not None and args.calib_images < 1:
        raise CBDError(f"--calib-images must be at least 1, got {args.calib_images}")
    shape = _input_shape(args.input_shape)
    out, (onnx_target, json_target) = open_outputs(args, [(args.output, "ONNX file"), (args.json, "JSON report")])
    with out:  # outputs checked before any work, published together at the very end
        with reading_cbd(args.file, checkpoint_hint(args.file, "export")):
            parsed = read(args.file, decode=False)  # the header is all it needs: load decodes, bounded by the model
        arch = args.arch or parsed.meta.get("arch")
        spec = input_spec(arch, shape)
        skeleton = None
        if args.arch is not None:
            kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
            skeleton = build(args.arch, allow_import=True, **kwargs)
        model = load(args.file, skeleton)
        calibration = _calibration(args.calib, args.calib_images) if args.int8 else None
        data, report = export_onnx_bytes(model, input_shape=spec.shape, int8=args.int8, calibration=calibration,
                                         metadata=_metadata(parsed, str(arch), spec, args),
                                         activation_dtype=args.activations,
                                         activation_calibration=args.calib_method)
        report.path = str(args.output)
        out.write(onnx_target, data)
        payload = {**report.to_dict(), "source": args.file, "arch": arch, "input_shape": list(spec.shape)}
        finish(out, json_target, payload if args.json else None)
    if not args.quiet:  # with --json -, standard output is the JSON document alone
        stream = sys.stderr if args.json == "-" else sys.stdout
        kind = f"int8 weights + {args.activations} activations" if args.int8 else "int8 weights, float activations"
        print(f"wrote {args.output}: {report.bytes:,} bytes, ONNX opset {report.opset}, {kind}, "
              f"input {'x'.join(map(str, spec.shape))} (dynamic batch)", file=stream)
        for layer in report.layers:
            if layer.runs_as == "float":
                print(f"  {layer.name}: kept in float ({layer.reason})", file=stream)
        print(f"  {sum(layer.runs_as == 'int8' for layer in report.layers)} layers as exact int8 levels"
              + (f", {report.activations_quantized} activations quantized ({args.calib_method} ranges"
                 + (f"; {len(report.narrow_activations)} onto 0..127, inputs of layers with levels > 64)"
                    if report.narrow_activations else ")") if args.int8 else ""), file=stream)
    return 0
