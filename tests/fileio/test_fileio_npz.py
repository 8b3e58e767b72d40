"""``.npz`` data sets are read with bounded memory: a zip bomb (a tiny compressed file that inflates to GBs), a
``.npy`` header that declares a huge shape and a zip entry whose declared size lies are refused before (or
without) inflating them; good files come back exactly as ``np.load`` reads them."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cbdnet.cli import commands as cli
from cbdnet.errors import DataError
from cbdnet.fileio import InputError, NpzFormatError, read_npz
from cbdnet.zoo import data as zoo_data

pytestmark = pytest.mark.usefixtures("no_hang")
MiB = 1 << 20


def npz_bytes(compressed: bool = True, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def peak_bytes(function, *args, **kwargs) -> tuple[object, int]:
    """``function``'s result (or the exception it raised) and the peak memory it allocated (numpy arrays
    included: numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        result = function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - returned for the caller to check
        result = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, peak


def npy(shape: tuple, dtype: str, payload: bytes) -> bytes:
    """A .npy file whose header says ``shape``/``dtype`` whatever ``payload`` holds."""
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def zipped(members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def with_declared_size(data: bytes, size: int) -> bytes:
    """The archive with its (only) member's uncompressed size in the central directory replaced: a lie."""
    at = data.rindex(b"PK\x01\x02")
    return data[:at + 24] + struct.pack("<I", size) + data[at + 28:]


# ------------------------------------------------------------------ good files round trip exactly

def test_good_archives_round_trip_exactly():
    rng = np.random.default_rng(0)
    arrays = {"images": rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8),
              "labels": rng.integers(-3, 9, 5).astype(">i8"),
              "fortran": np.asfortranarray(rng.standard_normal((3, 7)).astype(np.float32)),
              "empty": np.zeros((0, 2), np.float64)}
    for compressed in (True, False):
        data = npz_bytes(compressed, **arrays)
        loaded = read_npz(data, list(arrays), shown="x.npz", max_array_bytes=10 * MiB)
        for key, array in arrays.items():
            assert loaded[key].dtype == array.dtype and loaded[key].shape == array.shape
            assert np.array_equal(loaded[key], array) and loaded[key].flags.writeable
    with pytest.raises(KeyError):
        read_npz(npz_bytes(x=np.zeros(2)), ["images"], shown="x.npz", max_array_bytes=MiB)


# ------------------------------------------------------------------ bombs and lies

def test_a_zip_bomb_is_refused_before_it_is_inflated():
    bomb = npz_bytes(images=np.zeros(256 * MiB, np.uint8))  # 256 MiB of zeros deflate to ~250 KB
    assert len(bomb) < MiB
    result, peak = peak_bytes(read_npz, bomb, ["images"], shown="bomb.npz", max_array_bytes=64 * MiB)
    assert isinstance(result, InputError), result
    assert "bomb.npz" in str(result) and "64.0 MiB" in str(result) and "256.0 MiB" in str(result)
    assert peak < 4 * MiB  # nothing was inflated
    loaded = read_npz(bomb, ["images"], shown="bomb.npz", max_array_bytes=256 * MiB + 128)  # at the limit: read
    assert loaded["images"].shape == (256 * MiB,) and not loaded["images"].any()


def test_a_header_declaring_a_huge_array_is_refused_unallocated():
    for shape, message in (((10**12,), "over the limit|exceed the limit"), ((10**7,), "declares")):
        data = zipped({"images.npy": npy(shape, "<f8", bytes(800))})
        result, peak = peak_bytes(read_npz, data, ["images"], shown="huge.npz", max_array_bytes=256 * MiB)
        assert isinstance(result, InputError) and "huge.npz" in str(result), result
        assert pytest.raises(InputError, read_npz, data, ["images"], shown="huge.npz",
                             max_array_bytes=256 * MiB).match(message)
        assert peak < 4 * MiB


@pytest.mark.parametrize("declared", [200, 10 * MiB])
def test_a_zip_entry_whose_size_lies_is_refused_with_bounded_reads(declared):
    """The directory says ``declared`` bytes; the deflate stream holds 64 MiB (a bomb in disguise) or the
    header+data do not match: refused, never more than the declared size (and the limit) inflated."""
    size = declared - 128  # a header of 128 bytes (numpy pads it to 64-byte alignment) + the declared payload
    member = npy((size,), "|u1", bytes(64 * MiB))
    assert len(member) - 64 * MiB == 128
    data = with_declared_size(zipped({"images.npy": member}, zipfile.ZIP_DEFLATED), declared)
    result, peak = peak_bytes(read_npz, data, ["images"], shown="liar.npz", max_array_bytes=32 * MiB)
    assert isinstance(result, InputError) and "liar.npz" in str(result), result
    assert peak < declared + 4 * MiB


def test_object_arrays_and_non_zips_are_refused():
    data = zipped({"images.npy": npy((2,), "|O", b"\x00" * 16)})
    with pytest.raises(InputError, match="objects"):
        read_npz(data, ["images"], shown="o.npz", max_array_bytes=MiB)
    with pytest.raises(NpzFormatError, match="not a readable .npz"):
        read_npz(b"not a zip", ["images"], shown="t.npz", max_array_bytes=MiB)


# ------------------------------------------------------------------ through the data specs and the CLI

def test_cli_refuses_a_compressed_bomb_with_one_line_naming_file_and_limit(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, images=np.zeros((4096, 32, 32, 3), np.uint8), labels=np.zeros(4096, np.int64))
    assert path.stat().st_size < 200_000  # 12 MiB of arrays
    monkeypatch.setattr(zoo_data, "MAX_NPZ_ARRAY_BYTES", 8 * MiB)
    with pytest.raises(DataError, match=r"bomb\.npz.*limit of 8\.0 MiB"):
        zoo_data.load_spec(f"cifar10-npz:{path}")
    code = cli.main(["eval", "--arch", "digits-cnn", "--weights", "random", "--data", f"cifar10-npz:{path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(path) in err and "limit of 8.0 MiB" in err
    monkeypatch.setattr(zoo_data, "MAX_NPZ_ARRAY_BYTES", 16 * MiB)
    assert len(zoo_data.load_spec(f"cifar10-npz:{path}")) == 4096


def test_the_real_data_set_loads_unchanged(cifar_calib):
    arrays = read_npz(Path(cifar_calib).read_bytes(), ["images", "labels"], shown="calib",
                      max_array_bytes=zoo_data.MAX_NPZ_ARRAY_BYTES)
    with np.load(cifar_calib, allow_pickle=False) as reference:
        assert np.array_equal(arrays["images"], reference["images"])
        assert np.array_equal(arrays["labels"], reference["labels"])
