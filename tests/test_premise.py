"""The premise curves (dac_core.world.premise) and the case sets they rest on: scenes of one
and three objects, a removal from three objects."""

import json
import random

import pytest
import torch

from dac_core import world as W
from dac_core.world import bench, premise


def test_edit_types_by_object_count():
    assert W.edit_types_for(2) == W.EDIT_TYPES
    assert "removal" not in W.edit_types_for(1) and "addition" in W.edit_types_for(1)
    assert "addition" not in W.edit_types_for(3) and "removal" in W.edit_types_for(3)
    one = W.random_scene(random.Random(0), 1)
    with pytest.raises(ValueError, match="removal needs a scene with two or three objects"):
        W.make_edit("removal", one, random.Random(0))


def test_a_removal_from_three_objects_is_a_valid_case_and_its_target_render_succeeds():
    cases = W.default_cases(1, seed=0, n_objects=3)
    assert [c.edit for c in cases] == list(W.edit_types_for(3))
    rng = random.Random(5)
    removals = [c for c in cases if c.edit == "removal"]
    removals += [W.make_edit("removal", W.random_scene(rng, 3), rng) for _ in range(6)]
    for case in removals:
        assert len(case.source.objects) == 3 and len(case.target.objects) == 2
        W.validate(case.target)
        assert W.Case.from_json(json.loads(json.dumps(case.to_json()))) == case
        perfect = bench.score(case, W.render(case.target))
        assert perfect.edit_ok and perfect.preserved and perfect.joint
        unchanged = bench.score(case, W.render(case.source))
        assert not unchanged.edit_ok and unchanged.preserved
    for case in W.default_cases(2, seed=3, n_objects=1) + W.default_cases(2, seed=3, n_objects=3):
        assert bench.score(case, W.render(case.target)).joint, case.edit


def test_two_object_sets_are_the_benchmarks():
    assert [c.to_json() for c in W.default_cases(2, seed=1, n_objects=2)] == \
        [c.to_json() for c in W.default_cases(2, seed=1)]


def test_a_snapshot_of_a_longer_fit_is_the_shorter_fit(make_backend):
    """U of S steps is the state after step S of a longer run: snapshotting is exact."""
    backend = make_backend("sd1")
    case = W.default_cases(1)[0]
    from dac_core.image import image_to_tensor

    latents = backend.encode_image(image_to_tensor(W.render(case.source), (W.SIZE, W.SIZE)))
    g = premise.Grid(points=[(4, 2), (4, 3)])
    counter: dict = {}
    store = premise.Store(None, "tiny")
    fits = premise.fit_unets(backend, store, case.source, latents, g, 4, counter)
    assert counter == {"unet": 1} and set(fits) == {2, 3}
    alone = premise.abduct_unet_lora(backend, latents, case.source_prompt,
                                     premise.TrainSettings(2, g.learning_rate, 4, max_grad_norm=g.max_grad_norm)).lora
    for stem, layer in alone.layers.items():
        assert torch.equal(layer.down, fits[2][0].layers[stem].down)
        assert torch.equal(layer.up, fits[2][0].layers[stem].up)
    assert any(not torch.equal(layer.up, fits[3][0].layers[stem].up) for stem, layer in alone.layers.items())
    premise.fit_unets(backend, store, case.source, latents, g, 4, counter)  # stored: nothing trained
    assert counter == {"unet": 1}


def test_runner_writes_every_point_and_trains_u_once_per_source_steps_and_rank(tmp_path, tiny_model_dirs,
                                                                               monkeypatch, capsys):
    calls = {"unet": [], "delta": []}
    real_u, real_delta = premise.abduct_unet_lora, premise.abduct_text_lora

    def count_u(backend, latents, prompt, settings, **kw):
        calls["unet"].append((prompt, settings.steps, settings.rank))
        return real_u(backend, latents, prompt, settings, **kw)

    def count_delta(backend, latents, prompt, u, settings, **kw):
        calls["delta"].append((prompt, settings.steps, kw["eta"]))
        return real_delta(backend, latents, prompt, u, settings, **kw)

    monkeypatch.setattr(premise, "abduct_unet_lora", count_u)
    monkeypatch.setattr(premise, "abduct_text_lora", count_delta)
    out = tmp_path / "r.json"
    argv = ["--model", tiny_model_dirs["sd1"], "--sets", "three", "--edits", "manipulation,removal",
            "--points", "2:2,2:3,full:2,full:3", "--etas", "0.8,0.4", "--betas", "0,1", "--text-steps", "2",
            "--matched", "2:3,full:3", "--sample-steps", "2", "--json", str(out)]
    premise.main(argv)
    data = json.loads(out.read_text())
    full = data["full_rank"]
    assert data["grid"]["points"] == [[2, 2], [2, 3], [full, 2], [full, 3]] and full > 2
    # one Abduction-1 per (source, rank), to the largest step count; its snapshots serve every step count
    # and both cases of the source
    source = W.default_cases(1, n_objects=3)[0].source_prompt
    assert sorted(calls["unet"]) == [(source, 3, 2), (source, 3, full)]
    assert data["counts"] == {"unet": 2, "delta": len(calls["delta"])}
    # one Abduction-2 per (case, U, eta): 2 cases, 2 ranks, 2 step counts, 2 etas; at U's 3 steps
    # with eta 0.8 it runs 3 steps (snapshot at 2 for DAC), else 2
    assert len(calls["delta"]) == 2 * 2 * 2 * 2
    assert sum(steps == 3 for _, steps, _ in calls["delta"]) == 2 * 2
    # every point: 2 cases x (target only + 2 ranks x 2 steps x (Abduction-1 only + 2 etas x 2 betas) + matched)
    points = data["points"]
    assert len(points) == 2 * (1 + 2 * 2 * (1 + 2 * 2)) + 2 * 2 * 1
    keys = {"set", "source", "n_objects", "edit", "target", "method", "unet_steps", "rank", "eta", "beta",
            "text_steps", "edit_ok", "keep", "joint", "psnr", "best_joint"}
    assert all(set(p) == keys for p in points)
    assert {p["method"] for p in points} == {premise.A1, premise.DAC, premise.MATCHED, premise.TARGET_ONLY}
    assert {p["text_steps"] for p in points if p["method"] == premise.MATCHED} == {3}
    assert {p["edit"] for p in points} == {"manipulation", "removal"}
    assert {p["n_objects"] for p in points} == {3}
    assert len(data["fits"]) == 2 * 2 and all("reconstruction_psnr" in f for f in data["fits"])
    # the summary: rates from the points, per set and edit type and overall
    row = next(r for r in data["summary"] if r["method"] == "DAC beta=1" and r["unet_steps"] == 3 and r["rank"] == 2
               and r["eta"] == 0.8 and r["set"] == "all" and r["edit"] == "overall")
    mine = [p for p in points if p["method"] == premise.DAC and p["beta"] == 1 and p["unet_steps"] == 3
            and p["rank"] == 2 and p["eta"] == 0.8]
    assert row["n"] == 2 and row["joint"] == pytest.approx(sum(p["joint"] for p in mine) / 2)
    assert set(data["timing"]) == {premise.point_name(r, s) for s in (2, 3) for r in (2, full)}
    assert {"device", "threads"} <= set(data["environment"]) and data["cpu_seconds"] > 0
    assert "Abduction-1 only" in capsys.readouterr().out
    # runs of other sets or etas merge into one result: lists joined, grids united
    other = json.loads(out.read_text())
    other["grid"]["etas"] = [0.8, 0.2]
    for p in other["points"]:
        p["eta"] = 0.2 if p["eta"] == 0.4 else p["eta"]
    both = premise.merge([data, other])
    at_04 = sum(p["eta"] == 0.4 for p in points)
    assert len(both["points"]) == len(points) + at_04 and both["grid"]["etas"] == [0.8, 0.4, 0.2]
    assert len(both["fits"]) == len(data["fits"])  # the same U, counted once
    assert both["counts"] == {"unet": 4, "delta": 2 * len(calls["delta"])}
    # plotting needs matplotlib, a benchmark-only dependency
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    premise.main(["--plot-only", str(out), "--plot", str(png)])
    assert png.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "curves_by_edit.png").read_bytes()[:4] == b"\x89PNG"


def test_matplotlib_is_a_benchmark_only_dependency():
    """Only the premise runner's plot imports matplotlib (lazily); pyproject's `bench` extra has it."""
    import os

    import tomllib
    from conftest import ROOT
    from test_package import _imported_modules, _package_of, _python_files

    for path in _python_files(os.path.join(ROOT, "dac_core")):
        if any(m.split(".")[0] == "matplotlib" for m in _imported_modules(path, _package_of(path))):
            assert path == os.path.join(ROOT, "dac_core", "world", "premise.py"), path
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(r.startswith("matplotlib") for r in extras["bench"])
