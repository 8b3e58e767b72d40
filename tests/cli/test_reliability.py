"""Issue 13, one regression test per class of failure: outputs never destroy a user's file (one output policy
for compress, eval, info and demo), inputs never hang or blow up memory, bad input is exit 2 with one line
naming the problem, large bottlenecks encode, verify/info output cannot be forged, and the file does not
depend on how the checkpoint's path was spelled."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from cbd_mutations import meta_of, rebuild, tensors_of, tiny_file

import cbdnet
from cbdnet.cli import commands as cli
from cbdnet.cli import demo, policy
from cbdnet.codec import encode_weight
from cbdnet.errors import DataError
from cbdnet.zoo.data import load_spec
from cbdnet.zoo.models import build

COMPRESS = ["compress", "--arch", "cbd_mutations:tiny_model", "--weights", "random", "-J", "3", "--quiet"]
OLD = b"a good file the user wants to keep\n"


@pytest.fixture(autouse=True)
def _alarm():
    """Nothing here may hang: a FIFO or /dev/zero opened by mistake fails the test instead."""
    def timeout(signum, frame):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(argv: list[str], capsys, expected: str) -> str:
    code, _, err = run(argv, capsys)
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("cbdnet"), err
    assert expected in err, (expected, err)
    return err


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def cbd(tmp_path) -> Path:
    path = tmp_path / "model.cbd"
    path.write_bytes(tiny_file())
    return path


@pytest.fixture
def ckpt(tmp_path) -> Path:
    path = tmp_path / "w.pt"
    torch.save(build("digits-cnn").state_dict(), path)
    return path


# ---------------------------------------------------------------- data loss: one output policy everywhere

def test_an_output_that_is_an_input_or_another_output_is_refused(tmp_path, cbd, ckpt, capsys):
    original, weights = cbd.read_bytes(), ckpt.read_bytes()
    refused([*COMPRESS, "-o", str(tmp_path / "x.cbd"), "--json", str(tmp_path / "x.cbd")], capsys, "same file")
    assert not (tmp_path / "x.cbd").exists()
    refused(["eval", str(cbd), "--data", "digits", "--json", str(cbd), "--force"], capsys, "the input")
    refused(["compress", "--arch", "digits-cnn", "--weights", str(ckpt), "--json", str(ckpt), "--force"], capsys,
            "the input")
    data = tmp_path / "d.npz"
    np.savez(data, images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, np.int64))
    saved = data.read_bytes()
    refused(["eval", "--arch", "cifar-resnet20", "--data", f"cifar10-npz:{data}", "--json", str(data), "--force"],
            capsys, "the input")
    hard = tmp_path / "hard.cbd"
    os.link(cbd, hard)  # another name of the same file
    refused(["eval", str(cbd), "--data", "digits", "--json", str(hard), "--force"], capsys, "same file as the input")
    assert cbd.read_bytes() == original and ckpt.read_bytes() == weights and data.read_bytes() == saved
    assert temps(tmp_path) == []


def test_json_and_eval_outputs_need_force_and_never_replace_links_or_devices(tmp_path, cbd, capsys):
    report = tmp_path / "r.json"
    report.write_bytes(OLD)
    refused(["eval", str(cbd), "--data", "digits", "--json", str(report)], capsys, "--force")
    refused([*COMPRESS, "--json", str(report)], capsys, "--force")
    assert report.read_bytes() == OLD
    link = tmp_path / "link.cbd"
    link.symlink_to(report)
    refused([*COMPRESS, "-o", str(link), "--force"], capsys, "symbolic link")
    assert link.is_symlink() and report.read_bytes() == OLD
    refused([*COMPRESS, "-o", os.devnull, "--force"], capsys, "character device")
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    refused([*COMPRESS, "--json", "/dev/stdout"], capsys, "give '-'")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused([*COMPRESS, "-o", str(fifo), "--force"], capsys, "FIFO")
    refused([*COMPRESS, "-o", ""], capsys, "empty output path")
    assert temps(tmp_path) == []


def test_json_dash_prints_strict_json_on_stdout_alone(cbd, capsys):
    code, out, err = run([*COMPRESS, "--json", "-"], capsys)
    assert code == 0 and err == ""
    assert json.loads(out)["config"]["planes"] == 3
    code, out, _ = run(["eval", str(cbd), "--data", "digits", "--json", "-"], capsys)
    assert code == 0 and 0.0 <= json.loads(out)["top1"] <= 1.0  # the text line went to stderr


def test_a_failing_report_with_force_leaves_the_old_model(tmp_path, capsys, monkeypatch):
    model, report = tmp_path / "m.cbd", tmp_path / "r.json"
    model.write_bytes(OLD)

    def broken(payload):
        raise OSError(32, "Broken pipe")

    monkeypatch.setattr(policy, "json_bytes", broken)
    code, _, err = run([*COMPRESS, "-o", str(model), "--json", str(report), "--force"], capsys)
    assert code == 1 and "Broken pipe" in err
    assert model.read_bytes() == OLD and not report.exists() and temps(tmp_path) == []


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path, capsys, monkeypatch):
    """Two runs to the same new -o: the later one (here: a file created while this run works) loses."""
    target = tmp_path / "m.cbd"
    real = cli.compress_encoded

    def compress_while_another_run_wins(*args, **kwargs):
        target.write_bytes(OLD)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "compress_encoded", compress_while_another_run_wins)
    refused([*COMPRESS, "-o", str(target)], capsys, "appeared while this run was working")
    assert target.read_bytes() == OLD and temps(tmp_path) == []


def test_demo_uses_the_output_policy(tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the demo trained although its output was refused")

    monkeypatch.setattr(demo, "train_digits_cnn", no_training)
    folder = tmp_path / "out"
    folder.mkdir()
    existing = folder / demo._file_name(*demo.SETTINGS[0])
    existing.write_bytes(OLD)
    refused(["demo", "--out-dir", str(folder), "--quiet"], capsys, "--force")
    assert existing.read_bytes() == OLD
    link = tmp_path / "link"
    link.symlink_to(folder)
    refused(["demo", "--out-dir", str(link), "--quiet", "--force"], capsys, "symbolic link")
    refused(["demo", "--out-dir", str(existing), "--quiet"], capsys, "not a directory")
    monkeypatch.setattr(demo, "SETTINGS", demo.SETTINGS[:1])
    monkeypatch.setattr(demo, "train_digits_cnn", lambda seed, quiet: build("digits-cnn", width=4).eval())
    code, _, err = run(["demo", "--out-dir", str(folder), "--quiet", "--force"], capsys)
    assert code == 0, err
    assert cbdnet.verify(existing) == [] and temps(folder) == []


def test_a_failed_demo_leaves_no_folder_it_created_and_an_old_one_as_it_was(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "train_digits_cnn", lambda seed, quiet: build("digits-cnn", width=4).eval())
    real_compress, calls = demo.compress_encoded, []

    def compress_then_fail(*args, **kwargs):  # the first model is staged in the folder, then the run fails
        calls.append(1)
        if len(calls) == 2:
            raise DataError("the second setting failed")
        return real_compress(*args, **kwargs)

    monkeypatch.setattr(demo, "compress_encoded", compress_then_fail)
    new = tmp_path / "new"
    refused(["demo", "--out-dir", str(new), "--quiet"], capsys, "the second setting failed")
    assert len(calls) == 2 and not new.exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_bytes(OLD)
    existing = old / demo._file_name(*demo.SETTINGS[0])
    existing.write_bytes(OLD)
    before = sorted(os.listdir(old))
    calls.clear()
    refused(["demo", "--out-dir", str(old), "--quiet", "--force"], capsys, "the second setting failed")
    assert sorted(os.listdir(old)) == before and existing.read_bytes() == OLD
    calls.clear()

    def made_temp_dir(prefix: str) -> str:
        (tmp_path / "tmpdemo").mkdir()
        return str(tmp_path / "tmpdemo")

    monkeypatch.setattr(demo.tempfile, "mkdtemp", made_temp_dir)
    refused(["demo", "--quiet"], capsys, "the second setting failed")  # the default temp folder goes too
    assert not (tmp_path / "tmpdemo").exists()


# ---------------------------------------------------------------- inputs: nothing hangs or blows up

def test_fifos_devices_and_oversized_inputs_are_refused_unread(tmp_path, ckpt, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.cbd"
    zero.symlink_to("/dev/zero")
    for path in (fifo, zero):
        refused(["info", str(path)], capsys, "not a regular file")
        refused(["compress", "--arch", "digits-cnn", "--weights", str(path)], capsys, "not a regular file")
        refused(["eval", "--arch", "cifar-resnet20", "--data", f"cifar10-npz:{path}"], capsys, "not a regular file")
    voc = tmp_path / "voc"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    os.mkfifo(voc / "ImageSets" / "Main" / "test.txt")
    refused(["eval", "--arch", "ssd300", "--data", f"voc:{voc}"], capsys, "not a regular file")


def _png(path: Path, width: int, height: int) -> None:
    """A 1-bit greyscale PNG written by hand: ~100 bytes however large it claims to be."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * height, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_image_folders_bound_sizes_and_follow_no_symlink_loops(tmp_path):
    folder = tmp_path / "images"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "loop").symlink_to(folder / "cat")  # a loop: must end
    _png(folder / "cat" / "thin.png", 1, 6000)
    data = load_spec(f"imagefolder:{folder}")
    assert len(data) == 1
    with pytest.raises(DataError, match="aspect ratio"):
        next(data.batches(1))
    _png(folder / "cat" / "thin.png", 9000, 9000)  # 81 Mpx: over the bound before Pillow decodes anything
    with pytest.raises(DataError, match="over the limit"):
        next(data.batches(1))


def test_voc_lists_must_be_utf8(tmp_path, capsys):
    voc = tmp_path / "voc"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "test.txt").write_bytes(b"00\xff\xfe01\n")
    refused(["eval", "--arch", "ssd300", "--data", f"voc:{voc}"], capsys, "not UTF-8")


def test_a_file_asking_for_a_huge_model_is_refused_before_building(tmp_path, capsys):
    data = tiny_file()
    meta = meta_of(data)
    meta["arch_kwargs"] = {"width": 4, "num_classes": 10**9}
    crafted = tmp_path / "huge.cbd"
    crafted.write_bytes(rebuild(tensors_of(data), meta))
    refused(["info", str(crafted)], capsys, "out of range")
    refused(["eval", str(crafted), "--data", "digits"], capsys, "out of range")


# ---------------------------------------------------------------- bad input is exit 2, naming the problem

def _npz(path: Path, images: np.ndarray, labels: np.ndarray) -> str:
    np.savez(path, images=images, labels=labels)
    return f"cifar10-npz:{path}"


def test_data_that_does_not_fit_the_model(tmp_path, capsys):
    resnet = ["eval", "--arch", "cifar-resnet20", "--weights", "random", "--quiet", "--data"]
    images = np.zeros((3, 32, 32, 3), np.uint8)
    refused([*resnet, _npz(tmp_path / "big.npz", images, np.array([0, 1, 10]))], capsys, "label 10")
    refused([*resnet, _npz(tmp_path / "neg.npz", images, np.array([0, -1, 2]))], capsys, "negative label")
    refused([*resnet, _npz(tmp_path / "empty.npz", images[:0], np.zeros(0, np.int64))], capsys, "is empty")
    refused([*resnet, "digits"], capsys, "1-channel images")
    camvid = tmp_path / "camvid.npz"
    np.savez(camvid, test_images=np.zeros((2, 32, 32, 3), np.uint8), test_labels=np.zeros((2, 32, 32), np.uint8))
    refused([*resnet, f"camvid-npz:{camvid}"], capsys, "segmentation data")
    refused(["compress", "--arch", "cifar-resnet20", "--weights", "random", "--quiet", "--data",
             f"camvid-npz:{camvid}"], capsys, "segmentation data")
    voc = tmp_path / "voc"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / folder).mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (40, 30)).save(voc / "JPEGImages" / "a.jpg")
    (voc / "Annotations" / "a.xml").write_text("<annotation><object><name>dog</name><bndbox><xmin>1</xmin>"
                                               "<ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>"
                                               "</annotation>")
    (voc / "ImageSets" / "Main" / "test.txt").write_text("a\n")
    refused([*resnet, f"voc:{voc}"], capsys, "detection data")


def test_numeric_ranges_are_usage_errors(capsys, monkeypatch):
    for flag, value in (("--batch-size", "0"), ("--batch-size", "-1"), ("--num-classes", "0"),
                        ("--num-classes", "-1"), ("--num-classes", "10000000"), ("--seed", "1" + "0" * 30)):
        refused([*COMPRESS, flag, value], capsys, flag)
    refused([*COMPRESS, "--calib", "digits:train", "--calib-images", "0"], capsys, "--calib-images")
    refused([*COMPRESS, "--calib", "digits:train", "--calib-images", "-45"], capsys, "--calib-images")
    monkeypatch.setenv("CBDNET_WORKERS", "many")
    refused(COMPRESS, capsys, "CBDNET_WORKERS")


def _checkpoints(tmp_path: Path) -> dict[str, Path]:
    state = build("digits-cnn").state_dict()
    variants = {
        "non-string": {1: state["features.0.weight"]},
        "sparse": {**state, "features.0.bias": state["features.0.bias"].to_sparse()},
        "complex": {**state, "features.0.bias": state["features.0.bias"].to(torch.complex64)},
        "float8": {**state, "features.0.bias": state["features.0.bias"].to(torch.float8_e4m3fn)},
        "quantized": {**state, "features.0.bias": torch.quantize_per_tensor(state["features.0.bias"], 0.1, 0,
                                                                             torch.qint8)},
        "meta": {**state, "features.0.bias": torch.empty(32, device="meta")},
    }
    paths = {}
    for name, checkpoint in variants.items():
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(checkpoint, paths[name])
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    paths["broken legacy"] = tmp_path / "broken.pt"
    paths["broken legacy"].write_bytes(legacy.read_bytes()[: legacy.stat().st_size // 2])
    return paths


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_odd_checkpoints_are_weight_errors(tmp_path, capsys):
    for name, path in _checkpoints(tmp_path).items():
        err = refused(["compress", "--arch", "digits-cnn", "--weights", str(path), "--quiet"], capsys, str(path))
        assert ("not a string" if name == "non-string" else "cannot read" if name == "broken legacy" else
                "tensor") in err, (name, err)


# ---------------------------------------------------------------- the large-bottleneck bug on valid input

@pytest.mark.parametrize("bottleneck", [0.9, 1.0])
def test_large_bottlenecks_encode_real_resnet20_layers(resnet20_weights, bottleneck):
    state = torch.load(resnet20_weights, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    names = ("conv1.weight", "layer1.0.conv1.weight", "layer2.0.conv2.weight", "layer3.2.conv2.weight",
             "linear.weight")
    for name in names:
        weight = state.get(name, state.get("module." + name)).numpy()
        code = encode_weight(weight, 5, bottleneck, name=name)
        levels, steps = code.levels()
        error = np.abs(code.decode() - weight).max()
        assert levels.shape == weight.shape and error <= np.abs(weight).max() / 2 ** 4, (name, error)


@pytest.mark.parametrize("bottleneck", ["0.9", "1"])
def test_large_bottlenecks_compress_the_digits_model(tmp_path, capsys, bottleneck):
    out = tmp_path / "d.cbd"
    code, _, err = run(["compress", "--arch", "digits-cnn", "--weights", "random", "-b", bottleneck, "--quiet",
                        "-o", str(out)], capsys)
    assert code == 0, err
    assert cbdnet.verify(out) == []


# ---------------------------------------------------------------- verify and info: nothing forged, valid JSON

def _with_float(data: bytes, key: str, value: float) -> bytes:
    tensors = tensors_of(data)
    tensors["float/" + key] = tensors["float/" + key].copy()
    tensors["float/" + key][0] = value
    return rebuild(tensors, meta_of(data))


def test_verify_finds_nan_and_inf_float_tensors_and_info_json_stays_json(tmp_path, capsys):
    data = tiny_file()
    key = next(k for k in meta_of(data)["floats"] if k["key"].endswith("running_var"))["key"]
    for value in (float("nan"), float("inf")):
        path = tmp_path / "bad.cbd"
        path.write_bytes(_with_float(data, key, value))
        code, _, err = run(["info", "--verify", "--quiet", str(path)], capsys)
        assert code == 1 and f"float tensor {key} holds NaN/Inf" in err
        code, out, _ = run(["info", "--json", "--verify", str(path)], capsys)
        parsed = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
        assert parsed["verify"]["ok"] is False


class _Named(torch.nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.add_module(name, torch.nn.Linear(8, 8))


def test_names_are_escaped_and_verify_prints_one_line_per_layer(tmp_path, capsys):
    forged = "x\nverify: OK: checksum and every plane verified"
    model, _ = cbdnet.compress(_Named(forged), cbdnet.CBDConfig(planes=4, bottleneck=0.5, fallback="size"),
                               progress=False)
    path = tmp_path / "forged.cbd"
    # format 1 stores each plane as its own tensor with a SHA-256 that verify re-checks (format 2 refuses a wrong
    # factored plane on reading, by its CRC-32), so the forgery is a format-1 file whose every plane is wrong
    path.write_bytes(cbdnet.format.encode_file(model, version=1))
    data = bytearray(path.read_bytes())
    tensors = tensors_of(bytes(data))
    for key in tensors:  # every plane of the layer wrong
        if ".bits" in key or key.endswith((".B", ".C")):
            tensors[key] = (tensors[key] ^ 0xFF).astype(np.uint8)
    path.write_bytes(rebuild(tensors, meta_of(bytes(data))))
    code, out, err = run(["info", "--verify", str(path)], capsys)
    assert code == 1
    assert not any(line.startswith("verify: OK") for line in out.splitlines())
    assert "verify: FAILED" in out and len(err.splitlines()) == 1 and "\\n" in err


# ---------------------------------------------------------------- determinism

def test_two_spellings_of_the_weights_path_give_identical_files(tmp_path, ckpt, capsys, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    outputs = []
    for spelling, name in ((str(ckpt), "a.cbd"), ("sub/../w.pt", "b.cbd")):
        code, _, err = run(["compress", "--arch", "digits-cnn", "--weights", spelling, "-J", "3", "--quiet", "-o",
                            name], capsys)
        assert code == 0, err
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    assert cbdnet.format.read(tmp_path / "a.cbd").meta["extra"]["weights_sha256"] == \
        hashlib.sha256(ckpt.read_bytes()).hexdigest()



WARNS = """
import sys, warnings
from cbdnet.cli import commands

def warns(args, caught):
    warnings.warn("a library warning", UserWarning, stacklevel=1)
    return 0

commands._run = warns
sys.exit(commands.main(["info", "whatever.cbd"]))
"""


def test_a_warning_of_a_run_that_succeeds_is_shown_once():
    """Shown inside the recording, a warning was recorded again as it was shown: the loop over the recorded
    warnings never ended and memory grew without bound (any library warning of a successful command). In a
    subprocess: pytest records warnings itself; its address space is capped, so that a regression fails."""
    import resource
    import subprocess
    import sys

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (5 << 30, 5 << 30))
    done = subprocess.run([sys.executable, "-c", WARNS], capture_output=True, text=True, timeout=120,
                          preexec_fn=cap)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("a library warning") == 1
