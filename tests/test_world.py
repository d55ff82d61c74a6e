"""The synthetic world: renderer, captions, edits and the exact checker."""

import json
import random

import numpy as np
import pytest
from PIL import ImageFilter

from dac_core import world as W

SCENE = W.Scene("green", "striped",
                (W.Obj("circle", "red", "small", "left"), W.Obj("square", "blue", "large", "right")))


def noisy(img, seed, sigma=8.0, blur=0.6):
    img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img).astype(float) + np.random.default_rng(seed).normal(0, sigma, (W.SIZE, W.SIZE, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def test_caption_reads_left_to_right():
    assert W.caption(SCENE) == ("a small red circle on the left and a large blue square on the right "
                                "on a striped green background")
    three = W.Scene("white", "plain", (W.Obj("star", "yellow", "large", "center"), W.Obj("triangle", "purple", "small",
                                       "right"), W.Obj("circle", "orange", "small", "left")))
    assert W.caption(three) == ("a small orange circle on the left, a large yellow star in the middle and a small "
                                "purple triangle on the right on a white background")


def test_render_is_deterministic_and_spec_sensitive():
    a, b = W.render(SCENE), W.render(SCENE)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()
    for other in (W.Scene("green", "checked", SCENE.objects),
                  W.Scene("green", "striped", (SCENE.objects[0],)),
                  W.Scene("green", "striped", (W.Obj("star", "red", "small", "left"), SCENE.objects[1]))):
        assert W.render(other).tobytes() != a.tobytes()


@pytest.mark.parametrize("scene, message", [
    (W.Scene("pink", "plain", (W.Obj("circle", "red", "small", "left"),)), "background 'pink' is not one of"),
    (W.Scene("green", "wavy", (W.Obj("circle", "red", "small", "left"),)), "texture 'wavy' is not one of"),
    (W.Scene("green", "plain", ()), "one to three objects, not 0"),
    (W.Scene("green", "plain", (W.Obj("hexagon", "red", "small", "left"),)), "object shape 'hexagon'"),
    (W.Scene("green", "plain", (W.Obj("circle", "green", "small", "left"),)), "a green object on a green background"),
    (W.Scene("green", "plain", (W.Obj("circle", "red", "small", "left"), W.Obj("star", "blue", "large", "left"))),
     "two objects at position 'left'"),
    (W.Scene("green", "plain", (W.Obj("circle", "red", "small", "left", dy=3),)), "object dy 3 is not an integer"),
    (W.Scene("green", "striped", (W.Obj("circle", "red", "small", "left"),), phase=8), "phase 8 is not an integer"),
])
def test_invalid_specs_are_named(scene, message):
    with pytest.raises(ValueError, match=message):
        W.validate(scene)


def test_height_and_phase_are_in_the_image_not_in_the_caption():
    """Like a photo's uncaptioned details: the same caption, other pixels; the checker reads
    attributes (any height, any phase), and only the PSNR against the source tells them apart."""
    moved = W.Scene("green", "striped", (W.Obj("circle", "red", "small", "left", dy=-2), SCENE.objects[1]), phase=3)
    assert W.caption(moved) == W.caption(SCENE)
    assert W.render(moved).tobytes() != W.render(SCENE).tobytes()
    assert W.check(SCENE, W.render(moved)).all_ok and W.check(moved, W.render(SCENE)).all_ok
    report = W.check(SCENE, W.render(moved), reference=W.render(SCENE), reference_scene=SCENE)
    assert report.psnr < 15  # the stripes are out of phase
    rng = random.Random(5)
    scenes = [W.random_scene(rng) for _ in range(50)]
    assert len({s.phase for s in scenes}) == W.STRIPE
    assert len({o.dy for s in scenes for o in s.objects}) == 2 * W.MAX_DY + 1


def test_checker_passes_the_scene_itself():
    report = W.check(SCENE, W.render(SCENE), reference=W.render(SCENE), reference_scene=SCENE)
    assert report.all_ok and report.psnr == float("inf") and report.mae == 0.0


@pytest.mark.parametrize("edit", W.EDIT_TYPES)
def test_checker_sees_each_edit_type(edit):
    rng = random.Random(7)
    for _ in range(5):
        source = W.random_scene(rng, 2 if edit in ("removal", "addition") else None)
        case = W.make_edit(edit, source, rng)
        target_img = W.render(case.target)
        assert W.check(case.target, target_img).all_ok
        report = W.check(case.source, target_img, reference=W.render(case.source), reference_scene=case.target)
        assert not report.all_ok
        changed = [o for o in report.objects if not o.ok]
        if edit == "manipulation":
            assert len(changed) == 1 and not changed[0].colour_ok and changed[0].shape_ok
        elif edit == "replacement":
            assert len(changed) == 1 and not changed[0].shape_ok and changed[0].colour_ok
        elif edit == "size":
            assert len(changed) == 1 and not changed[0].size_ok and changed[0].shape_ok
        elif edit == "addition":
            assert report.extra_objects and not changed
        elif edit == "removal":
            assert len(changed) == 1 and not changed[0].position_ok
        else:
            assert not report.texture_ok and not changed
            assert report.psnr < 30  # the background is what changed
        if edit != "style":
            assert report.psnr == float("inf")  # outside both specs' objects nothing moved


def test_checker_accuracy_on_held_out_degraded_renders():
    """At least 99% correct verdicts on noisy, blurred renders of unseen scenes (both ways)."""
    rng = random.Random(2024)
    correct = total = 0
    for k in range(120):
        scene = W.random_scene(rng)
        correct += W.check(scene, noisy(W.render(scene), k)).all_ok
        total += 1
        try:
            case = W.make_edit(W.EDIT_TYPES[k % 6], scene, rng)
        except ValueError:
            continue
        correct += not W.check(scene, noisy(W.render(case.target), k)).all_ok
        total += 1
    assert correct / total >= 0.99, correct / total


def test_default_cases_and_case_files(tmp_path):
    cases = W.default_cases()
    assert [sum(c.edit == e for c in cases) for e in W.EDIT_TYPES] == [6] * 6
    assert [c.to_json() for c in cases] == [c.to_json() for c in W.default_cases()]
    assert all(c.source_prompt != c.target_prompt for c in cases)
    path = tmp_path / "cases.json"
    W.save_cases(cases, str(path))
    assert [c.to_json() for c in W.load_cases(str(path))] == [c.to_json() for c in cases]
    bad = json.loads(path.read_text())
    bad[3]["target"]["background"] = "pink"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"cases.json: case 3: background 'pink'"):
        W.load_cases(str(path))


def test_checker_survives_an_image_without_background():
    """A generated image can be all object colours: no background to read, not a crash."""
    scene = W.Scene("white", "striped", (W.Obj("circle", "red", "large", "center"),))
    report = W.check(scene, np.full((W.SIZE, W.SIZE, 3), W.COLOURS["red"], np.uint8))
    assert not report.background_ok and not report.texture_ok and not report.all_ok


def test_blobs_tell_an_object_drawn_twice_from_one():
    scene = W.Scene("green", "striped", (W.Obj("star", "red", "small", "left"),))
    one = np.asarray(W.render(scene))
    below = np.roll(W.object_mask(scene.objects[0]), 16, 0)  # a second copy 16 px lower
    twice = np.where(below[..., None], np.roll(one, 16, 0), one)
    assert len(W.blobs(scene, one, "left")) == 1
    assert len(W.blobs(scene, twice, "left")) == 2
    assert W.blobs(scene, one, "right") == []
