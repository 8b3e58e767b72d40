"""What ``cbdnet.load`` leaves on a model, float or int8 runtime: one documented attribute, ``model.cbdnet``.

The deprecated per-field attributes (``model.cbdnet_<field>``) are still mirrored for one release; anything
else named ``cbdnet*`` on the model would be state kept outside :class:`~cbdnet.nn.state.ModelState`.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

import cbdnet
from cbdnet.format import cbdfile
from cbdnet.nn.state import ModelState, state_of
from cbdnet.zoo.data import digits
from cbdnet.zoo.models import build

_DEPRECATED = {"cbdnet_" + f.name for f in fields(ModelState)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model, _ = cbdnet.compress(build("digits-cnn").eval(), cbdnet.RTNConfig(bits=4), progress=False)
    path = tmp_path_factory.mktemp("int8") / "m.cbd"
    cbdnet.save(model, path)
    return path


def _cbdnet_attributes(model: torch.nn.Module) -> set[str]:
    return {name for name in vars(model) if name.startswith("cbdnet")}


def _check_one_state(model: torch.nn.Module) -> ModelState:
    state = model.cbdnet
    assert isinstance(state, ModelState)
    extra = _cbdnet_attributes(model) - {"cbdnet"}
    assert extra <= _DEPRECATED, f"state outside model.cbdnet: {sorted(extra - _DEPRECATED)}"
    for name in extra:  # each deprecated mirror says what the state says
        assert getattr(model, name) is getattr(state, name.removeprefix("cbdnet_"))
    return state


def test_the_int8_model_keeps_its_report_in_model_cbdnet(saved):
    qmodel = cbdnet.load(saved, runtime="int8", calibration=digits("train").images[:32])
    state = _check_one_state(qmodel)
    report = state.int8_report
    assert report is not None and report.int8_layers, "no layer of the digits CNN runs in int8"
    assert {layer.name for layer in report.layers} >= set(report.int8_layers)
    assert state.arch == "digits-cnn"


def test_the_float_model_has_no_int8_report(saved):
    model = cbdnet.load(saved)
    assert _check_one_state(model).int8_report is None


def test_an_int8_model_cannot_be_saved_and_the_message_says_why(saved):
    qmodel = cbdnet.load(saved, runtime="int8", calibration=digits("train").images[:32])
    with pytest.raises(cbdnet.CBDError, match="int8-runtime model"):
        cbdfile.encode_file(qmodel)


def test_a_report_in_model_cbdnet_alone_marks_an_int8_model():
    """Code that sets ``model.cbdnet.int8_report`` and never the deprecated attribute: saving still says why."""
    model = build("digits-cnn")
    state_of(model).int8_report = "an int8 report"
    assert not hasattr(model, "cbdnet_int8_report")
    with pytest.raises(cbdnet.CBDError, match="int8-runtime model"):
        cbdfile.encode_file(model)
    with pytest.raises(cbdnet.CBDError, match="no compressed layers"):
        cbdfile.encode_file(build("digits-cnn"))
