"""One parameter model: the API, the CLI and the node schemas take their names, defaults and
ranges from dac_core.params, and each boundary rejects what the model rejects."""

import dataclasses

import pytest

from dac_core import params as P
from dac_core.cli import build_parser
from dac_core.edit import EditParams
from dac_core.errors import DACError
from dac_core.stages import TrainSettings
from tools.pack import node_spec

# Node inputs the node scopes to its own stage (every other node input that names a
# parameter carries the parameter's own name).
SCOPED = {
    ("DACAbductUNetLoRA", "steps"): P.UNET_STEPS, ("DACAbductUNetLoRA", "rank"): P.UNET_RANK,
    ("DACAbductUNetLoRA", "seed"): P.TRAIN_SEED,
    ("DACAbductTextLoRA", "steps"): P.TEXT_STEPS, ("DACAbductTextLoRA", "rank"): P.TEXT_RANK,
    ("DACAbductTextLoRA", "seed"): P.TRAIN_SEED,
    ("DACCounterfactualSample", "steps"): P.SAMPLE_STEPS, ("DACSweep", "steps"): P.SAMPLE_STEPS,
}


def test_the_api_defaults_are_the_models():
    fields = {f.name: f.default for f in dataclasses.fields(EditParams)}
    shared = set(fields) & set(P.PARAMS)
    assert len(shared) >= 15, sorted(shared)
    for name in shared:
        if name not in ("source_prompt", "target_prompt"):  # required: no default
            assert fields[name] == P.PARAMS[name].default, name
    assert TrainSettings().learning_rate == P.LEARNING_RATE.default
    assert TrainSettings().steps == P.TEXT_STEPS.default and TrainSettings().rank == P.TEXT_RANK.default


def test_the_cli_options_are_the_models():
    args = vars(build_parser().parse_args(["photo.png"]))
    shared = set(args) & set(P.PARAMS)
    assert shared == set(P.PARAMS) - {"train_batch_size"}, sorted(set(P.PARAMS) - shared)
    for name in shared - {"source_prompt", "target_prompt"}:
        assert args[name] == P.PARAMS[name].default, name


def test_the_node_inputs_are_the_models():
    spec = node_spec()
    checked = 0
    for node in spec.NODES:
        for i in node.inputs:
            param = SCOPED.get((node.id, i.name), P.PARAMS.get(i.name))
            if param is None or not i.is_widget:
                continue
            checked += 1
            # a widget needs a number: the UNet rank's is SD's default (the SDXL workflow sets SDXL's)
            default = P.UNET_RANK_DEFAULTS["sd"] if param is P.UNET_RANK else param.default
            assert i.default == default, (node.id, i.name)
            low = param.ui_low if param.low_open else param.low
            assert (i.min, i.max, i.step) == (low, param.high, param.ui_step), (node.id, i.name)
    assert checked >= 20


@pytest.mark.parametrize("name, value, message", [
    ("unet_steps", 0, r"unet_steps must be an integer in \[1, 100000\], got 0"),
    ("learning_rate", 0.0, r"learning_rate must be a number in \(0, 1\], got 0.0"),
    ("eta", 1.01, r"eta must be a number in \(0, 1\], got 1.01"),
    ("beta", float("nan"), r"beta must be a number in \[-3, 5\], got nan"),
    ("batch_size", 65, r"batch_size must be an integer in \[1, 64\], got 65"),
    ("unet_rank", 2.0, r"unet_rank must be an integer in \[1, 1024\], got 2.0"),
    ("target_prompt", " ", r"target_prompt is empty: give a caption of the wanted result"),
    ("resolution", 4, r"resolution must be an integer in \[8, 8192\], got 4"),
])
def test_the_api_rejects_what_the_model_rejects(name, value, message):
    params = EditParams("a cat", "a cat in a cap")
    assert params.check() is params
    with pytest.raises(DACError, match=message):
        dataclasses.replace(params, **{name: value}).check()


def test_open_and_closed_bounds():
    assert P.ETA.problem(1.0) is None and P.ETA.problem(0.0) is not None
    assert P.MAX_GRAD_NORM.problem(0.0) is None and P.MAX_GRAD_NORM.problem(None) is None
    assert P.RESOLUTION.problem(None) is None and P.UNET_STEPS.problem(None) is not None
    assert P.UNET_STEPS.problem(True) is not None  # a bool is not a step count
