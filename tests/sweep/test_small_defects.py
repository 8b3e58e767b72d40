"""Issue 28's small defects, each pinned: the sweep's progress bar counts the spec's points (not the FP32
evaluation too) and draws on a terminal only; saving an int8-runtime model says what it is and what to do;
plot labels sit clear of the markers and of each other."""

from __future__ import annotations

import contextlib
import io
import textwrap

import pytest

import cbdnet
from cbdnet.sweep import engine, load_spec, run_sweep
from cbdnet.sweep.plot import place_labels, plot_pareto, point_setting

SPEC = """
[model]
arch = "digits-cnn"
weights = "random"
[data]
eval = "digits:test"
[[point]]
method = "rtn"
bits = [2, 3, 4]
"""


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Future:
    def __init__(self, function, task):
        self.value = engine.execute(function, task)

    def result(self):
        return self.value

    def release(self):
        pass


class _Client:
    """In-process stand-in for a Dask client: runs each task when submitted."""
    loop = None

    def submit(self, execute, function, task, **kwargs):
        return _Future(function, task)


def _fast_point(task: dict) -> dict:
    return {"file_bits_per_weight": float(task["bits"]), "file_bytes": 100, "bits_per_weight": float(task["bits"]),
            "top1": 0.5, "n": 10}


def _sweep_with_bar(tmp_path, monkeypatch, stream) -> list:
    bars = []

    class Recorded(engine._Progress):
        def __init__(self, total, skipped, enabled, stream=None):
            super().__init__(total, skipped, enabled, stream=bar_stream)
            bars.append(self)

    bar_stream = stream
    monkeypatch.setattr(engine, "_Progress", Recorded)
    monkeypatch.setattr(engine, "_client", lambda *a: contextlib.nullcontext(_Client()))
    monkeypatch.setattr(engine, "_check_workers", lambda *a: None)
    import distributed

    monkeypatch.setattr(distributed, "as_completed", lambda futures, loop=None: list(futures))
    spec_path = tmp_path / "s.toml"
    spec_path.write_text(textwrap.dedent(SPEC))
    rows = run_sweep(load_spec(spec_path), tmp_path / "out", progress=True, point_function=_fast_point)
    assert [r["status"] for r in rows] == ["done"] * 3
    return bars


def test_the_sweep_bar_counts_points_not_the_fp32_run(tmp_path, monkeypatch):
    tty = _Tty()
    (bar,) = _sweep_with_bar(tmp_path, monkeypatch, tty)
    assert bar.bar.total == 3 and bar.bar.n == 3 and bar.done == 3
    drawn = tty.getvalue()
    assert "3/3" in drawn and "4/4" not in drawn and "/4" not in drawn


def test_the_sweep_bar_does_not_draw_into_a_redirected_stderr(tmp_path, monkeypatch):
    redirected = io.StringIO()  # not a terminal
    _sweep_with_bar(tmp_path, monkeypatch, redirected)
    assert redirected.getvalue() == ""


def test_saving_an_int8_runtime_model_says_what_it_is(tmp_path):
    pytest.importorskip("torch.ao.quantization")
    from cbdnet.zoo.data import digits
    from cbdnet.zoo.models import build

    model, _ = cbdnet.compress(build("digits-cnn").eval(), cbdnet.RTNConfig(bits=4), progress=False)
    cbdnet.save(model, tmp_path / "m.cbd")
    images = digits("train").images[:64]
    int8 = cbdnet.load(tmp_path / "m.cbd", runtime="int8", calibration=[images])
    with pytest.raises(cbdnet.CBDError) as caught:
        cbdnet.save(int8, tmp_path / "again.cbd")
    text = str(caught.value)
    assert "int8-runtime model" in text and "runtime='float'" in text and "run cbdnet.compress" not in text
    with pytest.raises(cbdnet.CBDError, match="run cbdnet.compress"):  # a model never compressed: as before
        cbdnet.save(build("digits-cnn"), tmp_path / "plain.cbd")


def _overlaps(boxes) -> int:
    count = 0
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0):
                count += 1
    return count


def test_labels_are_placed_clear_of_markers_and_each_other():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    points = [(1.0 + 0.02 * i, 0.70) for i in range(4)] + [(2.0, 0.80), (2.05, 0.80), (2.1, 0.801)]
    ax.plot(*zip(*points, strict=True), "o")
    ax.set_xlim(0.8, 2.4)
    ax.set_ylim(0.68, 0.82)
    notes = place_labels(ax, points, [f"0.{i}27" for i in range(len(points))])
    renderer = fig.canvas.get_renderer()
    boxes = [n.get_window_extent(renderer) for n in notes]
    assert _overlaps(boxes) == 0
    for box in boxes:  # no label on any marker (a marker is about 7 pixels wide)
        for x, y in (ax.transData.transform(p) for p in points):
            assert not (box.x0 < x < box.x1 and box.y0 < y < box.y1)
    plt.close(fig)


def test_a_sweep_plot_labels_each_point_with_its_setting(tmp_path, monkeypatch):
    rows = [{"series": "rtn channel", "bits": b, "file_bits_per_weight": b - 0.5, "top1": 0.8 + 0.01 * b,
             "fp32_top1": 0.85, "n": 1000} for b in (2, 3, 4)]
    rows.append({"series": "target-bits + calib", "target-bits": 2.5, "calib": True, "file_bits_per_weight": 2.5,
                 "top1": 0.84, "fp32_top1": 0.85, "n": 1000})
    texts = []
    real = place_labels

    def record(ax, points, labels, colors=None, fontsize=6.5):
        texts.extend(labels)
        return real(ax, points, labels, colors, fontsize)

    monkeypatch.setattr("cbdnet.sweep.plot.place_labels", record)
    plot_pareto(rows, tmp_path / "p.png")
    assert sorted(texts) == ["2b", "3b", "4b", "t2.5"] and (tmp_path / "p.png").stat().st_size > 1000
    assert point_setting({"planes": 5, "bottleneck": 0.3}) == "J5 b0.3"
