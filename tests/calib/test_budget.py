"""--target-bits: the budget holds exactly as the file stores it, and the choice is the least-loss one."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from cbdnet.calib.budget import RTN_BITS, SENSITIVITY_EXPONENTS, Candidate, choose
from cbdnet.cli import main
from cbdnet.codec.grid import encode_rtn
from cbdnet.format import cbdfile as io


def _candidates(seed: int) -> dict[str, list[Candidate]]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(4):
        weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
        options = []
        for bits in (2, 3, 4, 6):
            code = encode_rtn(weight, bits)
            options.append(Candidate(f"rtn{bits}", code, code.bits(), float(rng.uniform(0.5, 2.0)) / 4**bits))
        out[f"l{layer}"] = options
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [3.0, 3.5, 4.5])
def test_choice_fits_the_budget_and_is_near_the_exhaustive_optimum(seed, target):
    candidates = _candidates(seed)
    params = sum(c[0].code.numel for c in candidates.values())
    budget = target * params
    chosen = choose(candidates, budget)
    assert sum(c.bits for c in chosen.values()) <= budget
    best = min(sum(c.loss for c in combo) for combo in itertools.product(*candidates.values())
                if sum(c.bits for c in combo) <= budget)
    assert sum(c.loss for c in chosen.values()) <= 1.5 * best


def test_budget_below_the_cheapest_setting_is_an_error():
    candidates = _candidates(0)
    with pytest.raises(ValueError, match="cheapest"):
        choose(candidates, 1.0 * sum(c[0].code.numel for c in candidates.values()))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["3.0", "4.5"])
def test_cli_target_bits_counts_bits_as_the_file_stores_them(tmp_path, target):
    out, report = tmp_path / "m.cbd", tmp_path / "r.json"
    code = main(["compress", "--quiet", "--arch", "digits-cnn", "--weights", "random", "--target-bits", target,
                 "--calib", "digits:train", "--calib-images", "200", "-o", str(out), "--json", str(report)])
    assert code == 0
    result = json.loads(report.read_text())
    size = out.stat().st_size
    assert result["file_bits_per_weight"] == 8 * size / result["params"]
    assert result["file_bits_per_weight"] <= float(target)  # the whole file: header and float tensors included
    assert result["file_bits_per_weight"] > float(target) - 0.5  # the budget is used, not wasted
    parsed = io.read(out)
    stored_bits = sum(c.coded_bits() for c in parsed.codes.values())
    assert stored_bits == result["coded_weight_bits"]
    assert stored_bits / result["params"] == result["coded_bits_per_weight"]
    assert result["weight_bits"] == sum(layer["bits"] for layer in result["layers"])  # the fixed-length count
    header = size - stored_bits / 8 - result["float_params_bits"] / 8
    assert 0 < header <= 2048 + 8 * (len(parsed.codes) + len(parsed.floats)) + 60  # container, zlib header
    assert result["calibration"]["loss_after"] > 0


def test_cli_refuses_test_images_for_calibration(tmp_path, capsys):
    code = main(["compress", "--quiet", "--arch", "digits-cnn", "--weights", "random", "--target-bits", "3",
                 "--calib", "cifar10-npz:/nowhere/cifar10_test.npz"])
    assert code == 2
    assert "test images" in capsys.readouterr().err


def test_all_zero_layer_gets_candidates_that_decode_to_zero():
    from cbdnet.calib.budget import layer_candidates

    weight = np.zeros((4, 3, 3, 3), np.float32)
    options = layer_candidates(weight, None, levels=(3,), weighted_levels=(2, 4))
    assert len(options) == len(RTN_BITS) + 1 + 2 * len(SENSITIVITY_EXPONENTS)  # no composite code: nothing to factor
    assert all(not option.code.decode().any() for option in options)


def _stats(fisher: np.ndarray, d: int, seed: int = 0):
    import torch

    from cbdnet.calib.stats import LayerStats

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * d, d))
    return LayerStats(torch.from_numpy(x.T @ x / len(x)), torch.zeros(d, dtype=torch.float64),
                      torch.from_numpy(np.asarray(fisher, np.float64)), len(x))


def test_weighted_steps_follow_range_at_exponent_0_and_sensitivity_at_1():
    from cbdnet.calib.budget import weighted_steps

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 4, 3, 3)) * rng.uniform(0.1, 2.0, (8, 1, 1, 1))
    ranges = np.abs(weight.reshape(8, -1)).max(1)
    fisher = rng.uniform(0.01, 10.0, 8)
    steps, mag_bits = weighted_steps(weight, fisher, 5, 0.0)
    np.testing.assert_allclose(steps, ranges / 5, rtol=1e-6)  # a per-channel grid of 5 levels per side
    assert mag_bits == 3
    steps, _ = weighted_steps(weight, fisher, 5, 1.0)
    np.testing.assert_allclose(steps * np.sqrt(fisher), (steps * np.sqrt(fisher))[0], rtol=1e-6)  # s_c ~ f_c^-1/2
    assert np.exp(np.log(ranges / steps).mean()) == pytest.approx(5, rel=1e-6)  # 5 levels at the geometric mean
    steps, _ = weighted_steps(weight, np.ones(8), 5, 1.0)  # without calibration: one step for the layer
    np.testing.assert_allclose(steps, steps[0], rtol=1e-6)


def test_weighted_steps_zero_dead_channels_and_fit_six_bits():
    from cbdnet.calib.budget import weighted_steps
    from cbdnet.codec.grid import round_levels

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 10)).astype(np.float32)
    fisher = np.array([1.0, 0.0, 1e6, 1.0, 1e-20, 2.0])  # channel 1 dead, 2 very sensitive, 4 dead to 1e-12
    steps, mag_bits = weighted_steps(weight, fisher, 3, 1.0)
    levels = round_levels(weight, steps, mag_bits)
    assert not levels[[1, 4]].any()  # no bits for channels the loss does not see
    ranges = np.abs(weight).max(1)
    assert steps[2] == pytest.approx(ranges[2] / 63, rel=1e-6)  # capped: int8 kernels need no narrowing
    assert mag_bits == 6 and np.abs(levels).max() == 63


def test_weighted_grids_lose_less_than_per_channel_grids_at_equal_size():
    """Where channels differ in sensitivity, the same coded size buys less predicted loss with steps that
    follow the sensitivity (the point of the weighted candidates)."""
    from cbdnet.calib.budget import level_candidate, weighted_candidate

    rng = np.random.default_rng(2)
    weight = (rng.standard_normal((32, 8, 3, 3)) * 0.1).astype(np.float32)
    stats = _stats(np.exp(rng.uniform(-3, 3, 32)), 72)
    plain = [level_candidate(weight, count, stats, clip_ratios=(1.0,)) for count in (2, 3, 4, 6, 8, 12)]
    weighted = [weighted_candidate(weight, count, 1.0, stats) for count in (1.5, 2, 3, 4, 6, 8, 12)]
    curve = sorted((c.bits, c.loss) for c in weighted)
    for candidate in plain[1:-1]:  # inside the weighted curve's range of sizes
        loss_at = np.exp(np.interp(candidate.bits, [b for b, _ in curve], [np.log(loss) for _, loss in curve]))
        assert loss_at < 0.8 * candidate.loss, candidate.label


def _conv_net_and_stats(seed: int = 0):
    """A small CNN with the calibration statistics of seeded images (shared by the search tests)."""
    import torch
    from torch import nn

    from cbdnet.calib.stats import collect_stats
    from cbdnet.zoo.data import ClassificationData
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).eval()
    g = torch.Generator().manual_seed(seed)
    data = ClassificationData(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g), "toy")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return model, data, layers, collect_stats(model, layers, data)


# each target makes GPTQ candidates exact on a small conv net (seconds); 3.5 is the fast twin of 2.5
@pytest.mark.parametrize("target", [pytest.param(2.5, marks=pytest.mark.slow), 3.5])
def test_refined_choice_fits_and_loses_little_against_every_candidate_made_exact(target):
    from cbdnet.calib.budget import WEIGHTED_LEVELS, LayerSearch, choose_refined
    _, _, layers, stats = _conv_net_and_stats()

    def searches():
        return {name: LayerSearch(m.weight.detach().numpy(), stats[name], True, RTN_BITS, (3,), (2, 5), True,
                                  WEIGHTED_LEVELS, SENSITIVITY_EXPONENTS) for name, m in layers}
    budget = target * sum(m.weight.numel() for _, m in layers)
    lazy = searches()
    refined = choose_refined(lazy, budget)
    full = choose({name: s.candidates() for name, s in searches().items()}, budget)
    assert all(isinstance(c, Candidate) for c in refined.values())
    assert sum(c.bits for c in refined.values()) <= budget
    assert sum(c.loss for c in refined.values()) <= 1.02 * sum(c.loss for c in full.values())
    made = sum(e is not None for s in lazy.values() for e in s.exact)
    assert made < 0.8 * sum(len(s.plans) for s in lazy.values())  # GPTQ ran on fewer families than all


def test_unreachable_target_is_refused_before_any_candidate(monkeypatch):
    import torch
    from torch import nn

    import cbdnet
    from cbdnet.calib import pipeline
    from cbdnet.errors import CBDError
    # the header allowance alone is over 8,000 bits: far above 2 bits for each of these 448 weights
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.ReLU(), nn.Conv2d(64, 4, 1), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 3, 2, 2))

    def never(*args, **kwargs):
        raise AssertionError("a candidate was computed")
    monkeypatch.setattr(pipeline, "LayerSearch", never)
    with pytest.raises(CBDError, match="below the cheapest setting"):
        cbdnet.compress(model, cbdnet.BudgetConfig(target_bits=2.0), calibration=[torch.randn(8, 3, 2, 2)])


def test_retry_after_an_overshoot_reuses_statistics_and_candidates(monkeypatch):
    import cbdnet
    from cbdnet.calib import budget, pipeline
    model, data, _, _ = _conv_net_and_stats()
    calls = {"stats": 0, "search": 0}
    collect, search = pipeline.collect_stats, pipeline.LayerSearch

    def counted_stats(*args, **kwargs):
        calls["stats"] += 1
        return collect(*args, **kwargs)

    def counted_search(*args, **kwargs):
        calls["search"] += 1
        return search(*args, **kwargs)
    monkeypatch.setattr(pipeline, "collect_stats", counted_stats)
    monkeypatch.setattr(pipeline, "LayerSearch", counted_search)
    monkeypatch.setattr(pipeline, "header_allowance", lambda *sizes: 0)  # the first file overshoots
    assert budget.REFINE_TOP >= 1
    model, report = cbdnet.compress(model, cbdnet.BudgetConfig(target_bits=3.0), calibration=data)
    assert report.extra["budget_retries"] >= 1 and report.file_bits_per_weight <= 3.0
    # one statistics pass and one search per layer for every try (the second moments, moved to a temporary file
    # after each try's choice, are read back)
    assert calls == {"stats": 1, "search": 4}


def test_second_moments_are_released_before_refit_and_a_retry_reads_them_back_to_the_same_file(monkeypatch):
    """The d x d second moments leave memory once the codes are chosen (refit and the corrections do not read
    them); a retry reads them back from their temporary file, the same values: its file is the one of a run
    that held them."""
    import copy

    from cbdnet.calib import BudgetConfig, pipeline
    from cbdnet.calib import compress as calib_compress
    from cbdnet.format.fit import compress_encoded
    model, data, _, _ = _conv_net_and_stats()
    cache = pipeline.CompressCache()
    at_refit = []
    refit = pipeline.refit_levels

    def spied(*args, **kwargs):
        assert cache.calib is not None
        at_refit.append([(entry.released, entry.mean.numel(), entry.fisher.numel())
                         for entry in cache.calib.stats.values()])
        return refit(*args, **kwargs)
    monkeypatch.setattr(pipeline, "refit_levels", spied)
    calib_compress(copy.deepcopy(model), BudgetConfig(target_bits=3.0), calibration=data, progress=False, cache=cache)
    assert at_refit and all(released and means > 0 and fisher > 0 for released, means, fisher in at_refit[0])
    assert cache.calib is not None and len(cache.calib.stats) == 4
    entry = next(iter(cache.calib.stats.values()))
    with pytest.raises(RuntimeError, match="released"):
        entry.hessian.sum()
    assert entry.diagonal is False and entry.groups == 1  # the shape outlives the values (bias correction's groups)

    monkeypatch.setattr(pipeline, "header_allowance", lambda *sizes: 0)  # the first file overshoots: a retry
    _, report, released = compress_encoded(copy.deepcopy(model), BudgetConfig(target_bits=3.0), calibration=data,
                                           progress=False)
    assert report.extra["budget_retries"] >= 1
    monkeypatch.setattr(pipeline._Calibration, "release_second_moments", lambda self, keep: None)
    _, report_held, held = compress_encoded(copy.deepcopy(model), BudgetConfig(target_bits=3.0), calibration=data,
                                            progress=False)
    assert report_held.extra["budget_retries"] == report.extra["budget_retries"]
    assert released == held


def test_the_header_room_covers_every_label_the_budget_records(tmp_path):
    """Each layer's header entry records its code's label; the budget sets aside room for the longest label its
    candidates can carry, so every recorded label must be one of them (a new family with a new label updates
    ``candidate_labels``, or this fails)."""
    import cbdnet
    from cbdnet.calib import pipeline
    from cbdnet.calib.budget import candidate_labels
    from cbdnet.format import read, v2
    model, data, layers, _ = _conv_net_and_stats()
    config = cbdnet.BudgetConfig(target_bits=3.0, levels=(2, 5), composite_planes=(3,))
    model, report = cbdnet.compress(model, config, calibration=data)
    labels = candidate_labels(config.rtn_bits, config.composite_planes, config.levels, config.weighted_levels,
                              config.sensitivity_exponents)
    (tmp_path / "m.cbd").write_bytes(io.encode_file(model))
    written = {code.label for code in read(tmp_path / "m.cbd").codes.values()}
    assert len(written) >= 2 and written <= set(labels)
    header, _ = v2.header_of((tmp_path / "m.cbd").read_bytes()[24:])
    without = {**header, "layers": [{k: v for k, v in layer.items() if k != "label"} for layer in header["layers"]]}
    label_bytes = len(_zlib_json(header)) - len(_zlib_json(without))  # what the labels add to the stored header
    longest = max(map(len, labels))
    room = pipeline.header_allowance(len(layers), 8, longest) - pipeline.header_allowance(len(layers), 8)
    assert 0 < label_bytes <= room == pipeline.LABEL_FIRST_BYTES + len(layers) * pipeline.LABEL_BYTES


def _zlib_json(header: dict) -> bytes:
    """The header as the format-2 writer stores it (compact, sorted JSON, zlib level 9)."""
    import json
    import zlib
    return zlib.compress(json.dumps(header, separators=(",", ":"), sort_keys=True).encode(), 9)


def test_a_folded_norms_bias_is_counted_as_stored_even_while_it_is_zero():
    """Bias correction shifts a BatchNorm's running mean, which folding moves into its bias: a bias of zeros
    now is stored as float16 values in the file."""
    from torch import nn

    from cbdnet.calib.pipeline import file_overhead_bits
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)).eval()  # bias zeros, running mean zeros
    coded = {"0.weight"}
    plain = file_overhead_bits(model, coded, float32=False)
    folded = file_overhead_bits(model, coded, float32=False, folded=["1"])
    assert folded == plain + 8 * 2 * 16  # the bias, 16 float16 values, where it counted nothing before
    assert (file_overhead_bits(model, coded, float32=True, folded=["1"])
            == file_overhead_bits(model, coded, float32=True) + 8 * 4 * 16)  # float32 values


def test_the_budget_holds_one_float32_copy_of_each_weight(monkeypatch):
    """The originals are float32 (exact for a float32 model) and each layer's search holds that array itself, not
    a copy of it; they are copies of the model's weights, which later steps replace."""
    import cbdnet
    from cbdnet.calib import pipeline
    model, data, layers, _ = _conv_net_and_stats()
    weights = {name: module.weight.detach().numpy() for name, module in layers}
    seen: dict = {}
    encoder = pipeline._budget_encoder

    def recorded(config, originals, *args, **kwargs):
        seen["originals"] = originals
        seen["searches"] = searches = kwargs.get("searches", args[4] if len(args) > 4 else None)
        assert searches is not None  # cbdnet.compress passes its cache's dict
        return encoder(config, originals, *args, **kwargs)
    monkeypatch.setattr(pipeline, "_budget_encoder", recorded)
    cbdnet.compress(model, cbdnet.BudgetConfig(target_bits=3.0), calibration=data, progress=False)
    originals, searches = seen["originals"], seen["searches"]
    assert set(searches) == set(originals) == set(weights)
    for name, weight in originals.items():
        assert weight.dtype == np.float32 and np.array_equal(weight, weights[name])
        assert searches[name].weight is weight  # shared, not copied
        assert not np.shares_memory(weight, weights[name])


def test_second_moments_stay_in_memory_where_no_temporary_file_can_be_written(monkeypatch):
    import copy

    from cbdnet.calib import BudgetConfig, pipeline
    from cbdnet.format.fit import compress_encoded
    model, data, _, _ = _conv_net_and_stats()
    _, _, expected = compress_encoded(copy.deepcopy(model), BudgetConfig(target_bits=3.0), calibration=data,
                                      progress=False)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pipeline.tempfile, "TemporaryFile", full)
    seen = []
    release = pipeline._Calibration.release_second_moments
    monkeypatch.setattr(pipeline._Calibration, "release_second_moments",
                        lambda self, keep: seen.append(self) or release(self, keep))
    _, _, got = compress_encoded(copy.deepcopy(model), BudgetConfig(target_bits=3.0), calibration=data,
                                 progress=False)
    assert got == expected and seen
    assert not any(entry.released for calib in seen for entry in calib.stats.values())


def test_a_retry_reads_the_second_moments_back_from_a_file_closed_at_the_end(monkeypatch):
    import copy

    from cbdnet.calib import BudgetConfig, pipeline
    from cbdnet.format.fit import compress_encoded
    model, data, _, _ = _conv_net_and_stats()
    seen = []
    release = pipeline._Calibration.release_second_moments
    monkeypatch.setattr(pipeline._Calibration, "release_second_moments",
                        lambda self, keep: seen.append((self, keep)) or release(self, keep))
    monkeypatch.setattr(pipeline, "header_allowance", lambda *sizes: 0)  # the first file overshoots: a retry
    _, report, _ = compress_encoded(copy.deepcopy(model), BudgetConfig(target_bits=3.0), calibration=data,
                                    progress=False)
    assert report.extra["budget_retries"] >= 1 and len(seen) == 1 + report.extra["budget_retries"]
    calib = seen[0][0]
    assert all(keep and got is calib for got, keep in seen)  # one calibration, kept for the retries
    assert calib.spill is None and not calib.spilled  # closed when compress_encoded returned
    assert all(entry.released for entry in calib.stats.values())


def test_a_write_that_fails_part_way_keeps_every_second_moment(monkeypatch):
    """The first layer's H is written, the second's write fails (a disk filling up): the first is read back, the
    rest never left memory; nothing is lost and the file is the one of a run that kept them all."""
    import copy
    import tempfile

    from cbdnet.calib import BudgetConfig, pipeline
    from cbdnet.format.fit import compress_encoded
    model, data, _, _ = _conv_net_and_stats()
    _, _, expected = compress_encoded(copy.deepcopy(model), BudgetConfig(target_bits=3.0), calibration=data,
                                      progress=False)

    files, real = [], tempfile.TemporaryFile

    class FillsUp:
        def __init__(self, *args, **kwargs):
            self.file, self.writes = real(), 0  # closed through close()
            files.append(self)

        def write(self, data):
            self.writes += 1
            if self.writes > 1:
                raise OSError(28, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)
    monkeypatch.setattr(pipeline.tempfile, "TemporaryFile", FillsUp)
    seen = []
    release = pipeline._Calibration.release_second_moments
    monkeypatch.setattr(pipeline._Calibration, "release_second_moments",
                        lambda self, keep: seen.append(self) or release(self, keep))
    _, _, got = compress_encoded(copy.deepcopy(model), BudgetConfig(target_bits=3.0), calibration=data,
                                 progress=False)
    assert got == expected and seen
    assert [f.writes for f in files] == [2] and files[0].file.closed  # one layer written, the next one failed
    assert not any(entry.released for entry in seen[0].stats.values())
