"""NNCodec 2.1.3 (ISO/IEC 15938-17, DeepCABAC) on the pretrained CIFAR ResNet-20, data-free, at several QPs.

Runs in NNCodec's own venv (numpy<2; build it with ``bash bench/nncodec_env.sh``)::

    bench/.nncodec-venv/bin/python bench/nncodec_resnet20.py

For each QP it codes the checkpoint's state dict with NNCodec's documented data-free call for a dict of numpy
arrays (``nncodec.nn.encode(params, args={"qp": QP})``: uniform quantization with dependent (trellis)
quantization, DeepCABAC; every other setting at NNCodec's default, no calibration data), counts the bytes of the
whole bitstream file NNCodec writes, decodes that file, saves the decoded state dict with ``torch.save`` and
evaluates it with cbdnet's own ``cbdnet eval`` in cbdnet's environment. Every float tensor of the state dict goes
into the bitstream: Conv/Linear weights at ``qp``, the 1-D tensors (BatchNorm weight/bias/running stats, the
Linear bias) at NNCodec's ``nonweight_qp`` (-75, near-lossless). BatchNorm's int64 ``num_batches_tracked``
counters are left out (NNCodec codes float32/int32 only and its own torch loader drops them; inference never
reads them). Tensor names are stored without the ``module.`` prefix of the DataParallel checkpoint (they are part
of the bitstream: 7 bytes per tensor).

File bits per weight = bitstream bytes * 8 / the Conv/Linear weights (268,336 on ResNet-20).

When the output JSON already exists, the QPs measured now are MERGED into it (``--qps -29 -27 -24``): the points
stay sorted by QP, one per QP. A QP not yet there is added with its own ``command`` and ``date``. A QP already
there must reproduce exactly (bytes, bits per weight, top-1, top-5, n, 1-D error; the timing may differ): the
stored point is kept and this run is appended to its ``reproduced`` list; any difference stops the script before
it writes anything. The header (tool and library versions, weights, data, counts, settings, 1-D-only bytes and a
re-evaluated FP32) must match the stored one too. The top-level ``command``/``date`` stay those of the first run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBDNET_SHARED", REPO.parent / "shared"))  # the data and checkpoints beside the clone
MACHINE = "2-core AMD EPYC, no GPU, shared"
DEFAULT_QPS = list(range(-34, -13, 2))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qps", type=int, nargs="+", default=DEFAULT_QPS, help="NNCodec QPs (default -34 … -14)")
    p.add_argument("--weights", default=str(SHARED / "models" / "cifar10_resnet20.th"))
    p.add_argument("--data", default=f"cifar10-npz:{SHARED / 'data' / 'cifar10_test.npz'}")
    p.add_argument("--cbdnet-python", default=str(REPO / ".venv" / "bin" / "python"),
                   help="python of cbdnet's environment (cbdnet eval runs there with PYTHONPATH=<repo>/src)")
    p.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "nncodec",
                   help="bitstreams and decoded checkpoints (not committed)")
    p.add_argument("-o", "--out", type=Path, default=REPO / "bench" / "results" / "nncodec_resnet20.json")
    p.add_argument("--no-fp32", action="store_true", help="skip evaluating the uncompressed checkpoint")
    args = p.parse_args()
    if len(set(args.qps)) != len(args.qps):
        p.error(f"--qps repeats a QP: {args.qps}")
    return args


def load_params(path: str) -> dict[str, np.ndarray]:
    """The checkpoint's float tensors as float32 numpy arrays, ``module.`` stripped, ``num_batches_tracked`` out."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    return {k.removeprefix("module."): v.numpy().astype(np.float32) for k, v in state.items()
            if v.is_floating_point()}


def weight_count(params: dict[str, np.ndarray]) -> int:
    """Weights of the Conv/Linear layers: every tensor of 2 or more dimensions."""
    return sum(v.size for v in params.values() if v.ndim >= 2)


def code_and_decode(params: dict[str, np.ndarray], qp: int, work: Path) -> tuple[Path, dict[str, np.ndarray], float]:
    """Encode at ``qp`` (NNCodec writes the bitstream file itself), then decode that file. Returns the file, the
    decoded tensors and the seconds spent coding and decoding."""
    from nncodec.nn import decode, encode

    start = time.perf_counter()
    stream = encode(params, args={"qp": qp, "verbose": False, "results": str(work)})
    path = work / f"dNN_epoch0_qp_{qp}_bitstream.nnc"  # where nncodec.nn.encode writes it (model "NN", epoch 0)
    if path.stat().st_size != len(stream):
        raise RuntimeError(f"{path} holds {path.stat().st_size} bytes, the encoder returned {len(stream)}")
    decoded = decode(str(path), args={"verbose": False})
    return path, decoded, time.perf_counter() - start


def save_decoded(decoded: dict[str, np.ndarray], params: dict[str, np.ndarray], path: Path) -> float:
    """Write the decoded state dict for ``cbdnet eval``; return the largest error on the 1-D (non-weight) tensors."""
    if set(decoded) != set(params):
        raise RuntimeError(f"decoded tensors differ from the coded ones: {sorted(set(decoded) ^ set(params))}")
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32).reshape(params[k].shape).copy())
             for k, v in decoded.items()}
    torch.save({"state_dict": state}, path)
    return max(float(np.abs(decoded[k] - v).max()) for k, v in params.items() if v.ndim < 2)


def cbdnet_eval(python: str, weights: Path | str, data: str) -> dict:
    """``cbdnet eval --json -`` in cbdnet's environment; its JSON object."""
    cmd = [python, "-m", "cbdnet", "eval", "--arch", "cifar-resnet20", "--weights", str(weights), "--data", data,
           "--json", "-"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def nonweight_bytes(params: dict[str, np.ndarray], work: Path) -> int:
    """Bytes of a bitstream holding only the 1-D tensors (what the BatchNorm/bias part costs, roughly)."""
    from nncodec.nn import encode

    ones = {k: v for k, v in params.items() if v.ndim < 2}
    return len(encode(ones, args={"qp": -24, "verbose": False, "results": str(work), "model": "NN1d"}))


def shown_path(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (the venv's python), else as given."""
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return path


# a re-measured point must agree with the stored one in these fields (code_decode_s is a timing: it may differ)
MEASURED = ("bytes", "file_bits_per_weight", "top1", "top5", "n", "max_abs_err_1d")
# header fields two runs must share for their points to belong to one curve
SAME_SETUP = ("tool", "numpy", "torch", "machine", "weights", "data", "weights_counted", "tensors_coded", "settings",
              "nonweight_only_bytes")


def merge(old: dict, new: dict) -> dict:
    """``new``'s points merged into ``old`` (see the module docstring); raises ValueError on any disagreement."""
    diffs = [f"{k}: stored {old.get(k)!r}, now {new[k]!r}" for k in SAME_SETUP if old.get(k) != new[k]]
    if new["fp32"] is not None and old.get("fp32") not in (None, new["fp32"]):
        diffs.append(f"fp32: stored {old['fp32']}, now {new['fp32']}")
    by_qp = {p["qp"]: p for p in old["points"]}
    for p in new["points"]:
        stored = by_qp.get(p["qp"])
        if stored is None:
            by_qp[p["qp"]] = {**p, "command": new["command"], "date": new["date"]}
            continue
        diffs += [f"qp {p['qp']} {k}: stored {stored.get(k)!r}, now {p[k]!r}" for k in MEASURED
                  if stored.get(k) != p[k]]
        stored.setdefault("reproduced", []).append(
            {"command": new["command"], "date": new["date"], "code_decode_s": p["code_decode_s"]})
    if diffs:
        raise ValueError("not merged, the new measurement differs from the stored one:\n  " + "\n  ".join(diffs))
    return {**old, "fp32": old.get("fp32") or new["fp32"], "points": [by_qp[q] for q in sorted(by_qp)]}


def write_result(result: dict, out: Path) -> dict:
    """Write ``result``, merged into ``out`` when that file exists; returns what was written. Exits with one
    error line (and writes nothing) when the merge finds a disagreement."""
    if out.exists():
        try:
            result = merge(json.loads(out.read_text()), result)
        except ValueError as e:
            sys.exit(f"{out}: {e}")
    else:
        result = {**result, "points": sorted(result["points"], key=lambda p: p["qp"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict) -> str:
    lines = ["| QP | whole bitstream | file bits per weight | top-1 | top-5 |", "| ---: | ---: | ---: | ---: | ---: |"]
    if result.get("fp32"):
        fp = result["fp32"]
        lines.append(f"| FP32 checkpoint | — | 32 | {fp['top1']:.4f} | {fp['top5']:.4f} |")
    for p in result["points"]:
        lines.append(f"| {p['qp']} | {p['bytes']:,} B | {p['file_bits_per_weight']:.3f} | {p['top1']:.4f} | "
                     f"{p['top5']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    from importlib.metadata import version

    args.work.mkdir(parents=True, exist_ok=True)
    params = load_params(args.weights)
    n_weights = weight_count(params)
    result = {"tool": f"nncodec {version('nncodec')}", "numpy": np.__version__, "torch": torch.__version__,
              "command": shlex.join([shown_path(sys.executable), *sys.argv]), "machine": MACHINE,
              "date": datetime.date.today().isoformat(), "weights": args.weights, "data": args.data,
              "weights_counted": n_weights, "tensors_coded": len(params),
              "settings": "nncodec.nn.encode(params, args={'qp': QP}): uniform + dependent quantization, "
                          "nonweight_qp -75, DeepCABAC, data-free; 1-D tensors (BatchNorm, bias) included",
              "nonweight_only_bytes": nonweight_bytes(params, args.work), "fp32": None, "points": []}
    if not args.no_fp32:
        fp = cbdnet_eval(args.cbdnet_python, args.weights, args.data)
        result["fp32"] = {k: fp[k] for k in ("top1", "top5", "n")}
    for qp in args.qps:
        path, decoded, seconds = code_and_decode(params, qp, args.work)
        ckpt = args.work / f"resnet20_nncodec_qp{qp}.pt"
        err_1d = save_decoded(decoded, params, ckpt)
        ev = cbdnet_eval(args.cbdnet_python, ckpt, args.data)
        size = path.stat().st_size
        point = {"qp": qp, "bytes": size, "file_bits_per_weight": round(size * 8 / n_weights, 4),
                 "top1": ev["top1"], "top5": ev["top5"], "n": ev["n"], "code_decode_s": round(seconds, 2),
                 "max_abs_err_1d": err_1d}
        result["points"].append(point)
        print(f"qp {qp}: {size:,} B, {point['file_bits_per_weight']:.3f} bits/weight, top-1 {ev['top1']:.4f}",
              flush=True)
    print(f"\n{result['command']}\nmachine: {MACHINE}, {result['date']}; {result['tool']}, "
          f"{n_weights:,} Conv/Linear weights, 1-D tensors alone: {result['nonweight_only_bytes']:,} B\n")
    print(table(write_result(result, args.out)))


if __name__ == "__main__":
    main()
