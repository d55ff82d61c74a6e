"""The eta x beta sweep: U once, Delta once per eta, every cell as a single run gives it."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dac_core import edit as E
from dac_core import params as P
from dac_core.cli import main
from dac_core.edit import EditParams, edit
from dac_core.errors import DACError
from dac_core.image import labelled_grid
from dac_core.sweep import check_values, parse_values, sweep

SETTINGS = dict(unet_steps=6, text_steps=4, unet_rank=4, sample_steps=3, device="cpu")


@pytest.fixture
def counted(monkeypatch):
    """How often each abduction trains (the stage functions `dac_core.edit` calls)."""
    calls = {"unet": 0, "text": 0}
    for name, stage in (("unet", "abduct_unet_lora"), ("text", "abduct_text_lora")):
        original = getattr(E, stage)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(E, stage, counting)
    return calls


def test_two_etas_three_betas_train_u_once_delta_twice_and_cells_equal_single_runs(
        tmp_path, source_image, tiny_model_dirs, counted):
    params = EditParams("a red disc", "a red disc with a hat", model=tiny_model_dirs["sd1"], **SETTINGS)
    etas, betas = [0.6, 0.9], [0.0, 0.5, 1.5]
    result = sweep(source_image, params, etas, betas, workdir=tmp_path / "work")
    assert counted == {"unet": 1, "text": 2}
    assert [(c.eta, c.beta, c.seed) for c in result.cells] == [(e, b, 29) for e in etas for b in betas]
    for c in result.cells:
        assert os.path.basename(c.path) == f"eta{c.eta:g}_beta{c.beta:g}_seed29.png"
        assert np.array_equal(np.asarray(Image.open(c.path)), np.asarray(c.image))

    # a cell is what a single edit with its eta and beta gives, bit for bit: from scratch...
    single = edit(source_image, EditParams(**{**vars(params), "eta": 0.9, "beta": 1.5}), workdir=tmp_path / "alone")
    cell = next(c for c in result.cells if (c.eta, c.beta) == (0.9, 1.5))
    assert np.array_equal(np.asarray(single.images[0]), np.asarray(cell.image))
    # ...and reusing the sweep's LoRAs
    again = edit(source_image, EditParams(**{**vars(params), "eta": 0.6, "beta": 0.0}), workdir=tmp_path / "work")
    assert again.reused_unet and again.reused_text
    cell = next(c for c in result.cells if (c.eta, c.beta) == (0.6, 0.0))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(cell.image))
    assert not np.array_equal(np.asarray(result.cells[0].image), np.asarray(result.cells[2].image))  # beta acts

    # the grid: each cell's image where its box says, the record lists every cell
    w, h = result.cells[0].image.size
    scale = -(-128 // h)
    for c in result.cells:
        left, top = result.grid_boxes[(etas.index(c.eta), betas.index(c.beta))]
        shown = result.grid.crop((left, top, left + w * scale, top + h * scale)).resize((w, h), Image.NEAREST)
        assert np.array_equal(np.asarray(shown), np.asarray(c.image))
    assert result.grid.size[0] > 4 * w * scale and result.grid.size[1] > 3 * h * scale
    record = json.loads(open(result.record_path).read())
    assert record["etas"] == etas and record["betas"] == betas and len(record["cells"]) == 6
    assert {os.path.basename(c["text_lora"]) for c in record["cells"]} == {
        os.path.basename(p) for p in result.text_lora_paths.values()} and len(result.text_lora_paths) == 2

    # a re-run trains nothing
    counted.update(unet=0, text=0)
    sweep(source_image, params, etas, betas, workdir=tmp_path / "work")
    assert counted == {"unet": 0, "text": 0}


def test_the_grid_places_corner_labels_and_cells():
    """Solid tiles: the corner and every cell land in their boxes; labels are drawn in black."""
    def solid(rgb):
        return Image.new("RGB", (16, 8), rgb)

    cells = [[[solid((10 * i + j, 200, 0)), solid((10 * i + j, 0, 200))] for j in range(3)] for i in range(2)]
    grid, boxes = labelled_grid(solid((255, 0, 255)), "source", ["eta = 0.6", "eta = 0.9"],
                                ["beta = 0", "beta = 0.5", "beta = 1.5"], cells, min_side=32)
    assert set(boxes) == {(i, j) for i in range(2) for j in range(3)}
    for (i, j), (left, top) in boxes.items():
        assert grid.getpixel((left + 5, top + 5)) == (10 * i + j, 200, 0)  # first candidate
        assert grid.getpixel((left + 64 + 5, top + 5)) == (10 * i + j, 0, 200)  # second, beside it
    arr = np.asarray(grid)
    assert (arr == [255, 0, 255]).all(axis=-1).sum() == 64 * 32  # the corner tile, enlarged 4x
    assert (arr.sum(axis=-1) < 100).any()  # label text


@pytest.mark.parametrize("text, message", [
    ("", "eta is empty: give one or more numbers separated by commas, each in (0, 1]"),
    ("0.6, x", "eta must be one or more numbers separated by commas, each in (0, 1], got 'x' in '0.6, x'"),
    ("0.6,1.2", "eta must be one or more numbers separated by commas, each in (0, 1], got '1.2' in '0.6,1.2'"),
    ("0", r"eta must be a number in (0, 1], got 0.0"),
])
def test_bad_eta_lists_are_named(text, message):
    with pytest.raises(DACError) as e:
        parse_values(text, P.ETA)
    assert str(e.value) == message


def test_parsed_lists_and_the_api_checks():
    assert parse_values(" 0, 0.5,1.5 ", P.BETA) == [0.0, 0.5, 1.5]
    with pytest.raises(DACError, match="the list of beta values is empty"):
        check_values([], P.BETA)
    with pytest.raises(DACError, match=r"every eta value must be a number in \(0, 1\], got 1.5"):
        check_values([0.5, 1.5], P.ETA)
    assert check_values([1, 0.5, 1], P.BETA) == [1.0, 0.5]


@pytest.mark.parametrize("flag, value, message", [
    ("--beta", "0,,1", "argument --beta: must be one or more numbers separated by commas, each in [-3, 5], "
                       "got '' in '0,,1'"),
    ("--eta", "0.5,2", "argument --eta: must be one or more numbers separated by commas, each in (0, 1], "
                       "got '2' in '0.5,2'"),
])
def test_bad_lists_on_the_command_line_are_one_line(capsys, tmp_path, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "x.png"), "--source-prompt", "a", "--target-prompt", "b", f"{flag}={value}"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"dac-edit: error: {message}"]


def test_sweep_from_the_command_line(tmp_path, source_image, tiny_model_dirs, capsys):
    photo = tmp_path / "photo.png"
    source_image.save(photo)
    work = tmp_path / "work"
    code = main([str(photo), "--source-prompt", "a", "--target-prompt", "a b", "--model", tiny_model_dirs["sd1"],
                 "--workdir", str(work), "--unet-steps", "3", "--text-steps", "2", "--unet-rank", "4",
                 "--sample-steps", "2", "--device", "cpu", "--eta", "0.7,0.9", "--beta", "1", "--batch-size", "2"])
    assert code == 0
    assert str(work / "sweep_grid.png") in capsys.readouterr().out
    names = sorted(os.listdir(work / "sweep"))
    assert names == [f"eta{e}_beta1_seed{s}.png" for e in ("0.7", "0.9") for s in (29, 30)]
    record = json.loads((work / "dac_sweep.json").read_text())
    assert [(c["eta"], c["beta"], c["seed"]) for c in record["cells"]] == [
        (e, 1.0, s) for e in (0.7, 0.9) for s in (29, 30)]
