"""Scoring of the edit benchmark (issue 4, in progress): the checker decides, per case."""

import random

import pytest

from dac_core import bench
from dac_core import world as W


@pytest.mark.parametrize("edit", W.EDIT_TYPES)
def test_target_render_is_a_joint_success_and_source_render_is_not(edit):
    rng = random.Random(11)
    for _ in range(4):
        case = W.make_edit(edit, W.random_scene(rng, 2 if edit in ("removal", "addition") else None), rng)
        perfect = bench.score(case, W.render(case.target))
        assert perfect.edit_ok and perfect.preserved and perfect.joint
        unchanged = bench.score(case, W.render(case.source))
        assert not unchanged.edit_ok
        assert unchanged.preserved  # nothing else moved either


def test_a_different_scene_is_neither_edited_nor_preserved():
    rng = random.Random(3)
    case = W.make_edit("manipulation", W.random_scene(rng, 1), rng)
    other = W.Scene("white" if case.source.background != "white" else "gray", "checked",
                    (W.Obj("star", "red" if case.source.objects[0].colour != "red" else "blue", "large",
                           "left" if case.source.objects[0].position != "left" else "right"),))
    result = bench.score(case, W.render(other))
    assert not result.preserved and not result.joint


def test_methods_run_end_to_end_on_a_tiny_model(make_backend):
    case = W.default_cases(per_type=1)[0]
    backend = make_backend("sd1")
    images = bench.run_methods(backend, case, bench.Settings(unet_steps=2, te_steps=2, unet_rank=4, sample_steps=2),
                               seeds=[0])
    assert set(images) == {"DAC", "target prompt only", "Abduction-1 only", "DAC, no annealing (eta=1)",
                           "DAC, beta=0", "SDEdit 0.5", "SDEdit 0.75"}
    assert all(len(v) == 1 and v[0].size == (64, 64) for v in images.values())
