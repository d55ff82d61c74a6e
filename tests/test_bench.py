"""The edit benchmark: scoring by the checker, the methods, and its outputs (table, JSON, grid)."""

import json
import random

import pytest

from dac_core import world as W
from dac_core.world import bench


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


def test_default_cases_share_sources_and_the_unet_lora_is_fitted_once_per_source(make_backend, monkeypatch):
    cases = W.default_cases(per_type=2)
    assert len({json.dumps(c.source.to_json()) for c in cases}) == 2  # six edits of each source
    fitted = []
    real = bench.abduct_unet_lora
    monkeypatch.setattr(bench, "abduct_unet_lora", lambda *a, **k: fitted.append(a[2]) or real(*a, **k))
    backend = make_backend("sd1")
    s = bench.Settings(unet_steps=2, text_steps=2, unet_rank=4, sample_steps=2)
    cache: dict = {}
    methods = ("DAC", "Abduction-1 only")
    shared = [bench.run_methods(backend, case, s, [0], methods, cache) for case in cases[:2]]
    assert fitted == [cases[0].source_prompt]
    # sharing changes nothing but the time: a fresh fit of the same source gives the same images
    alone = bench.run_methods(backend, cases[1], s, [0], methods)
    assert len(fitted) == 2
    for method in methods:
        assert list(shared[1][method][0].getdata()) == list(alone[method][0].getdata())


def test_methods_run_end_to_end_on_a_tiny_model(make_backend):
    case = W.default_cases(per_type=1)[0]
    backend = make_backend("sd1")
    images = bench.run_methods(backend, case, bench.Settings(unet_steps=2, text_steps=2, unet_rank=4, sample_steps=2),
                               seeds=[0])
    assert set(images) == {"DAC", "target prompt only", "Abduction-1 only", "DAC eta=1 (no annealing)",
                           "DAC beta=0 (no subtraction)", "SDEdit 0.5", "SDEdit 0.75"}
    assert all(len(v) == 1 and v[0].size == (64, 64) for v in images.values())


def test_command_on_a_case_file_writes_table_json_markdown_and_grid(tmp_path, tiny_model_dirs, capsys):
    from PIL import Image

    cases = [W.default_cases(per_type=1)[k] for k in (0, 4)]  # a manipulation and a style edit
    W.save_cases(cases, tmp_path / "cases.json")
    out = {name: tmp_path / name for name in ("r.json", "r.md", "grid.png")}
    bench.main(["--model", tiny_model_dirs["sd1"], "--cases", str(tmp_path / "cases.json"), "--seeds", "2",
                "--unet-steps", "2", "--text-steps", "2", "--unet-rank", "4", "--sample-steps", "2",
                "--json", str(out["r.json"]), "--markdown", str(out["r.md"]), "--grid", str(out["grid.png"])])
    printed = capsys.readouterr().out
    assert "best-of-2 joint" in printed and "manipulation" in printed and "style" in printed

    data = json.loads(out["r.json"].read_text())
    assert [c["edit"] for c in data["cases"]] == ["manipulation", "style"]
    assert data["seeds"] == 2 and data["settings"]["unet_steps"] == 2
    assert {"device", "dtype", "threads"} <= set(data["environment"])
    assert data["summary"]["DAC"]["overall"]["n"] == 2
    for method, rows in data["summary"].items():  # figures are rates computed from the rows
        joint = [c["methods"][method]["single"]["joint"] for c in data["cases"]]
        assert rows["overall"]["joint"] == sum(joint) / 2

    md = out["r.md"].read_text().splitlines()
    assert md[0].startswith("| method | manipulation | style |") and len(md) == 2 + len(data["summary"])

    grid = Image.open(out["grid.png"])
    assert grid.width > (1 + len(data["summary"])) * W.SIZE * 2  # source + every method, 2x
    assert grid.height > 2 * W.SIZE * 2  # one row per edit type present
