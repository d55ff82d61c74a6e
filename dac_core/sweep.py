"""A labelled sweep over eta and beta on one photo, with the LoRAs shared.

DAC's result depends strongly on beta (how much of Delta is subtracted) and eta (how weak
U is at pure noise). A sweep trains U once, Delta once per eta (Abduction-2 depends on eta)
and samples every (eta, beta) cell with the same seeds, so that only the setting changes
between neighbouring cells. Everything trained is kept in the work folder and reused on a
re-run, as by `dac_core.edit`. Each cell's images leave the device once sampled: a sweep
holds one cell's batch there at a time.

    workdir/sweep/eta0.8_beta1_seed29.png   every image, named by its settings
    workdir/sweep_grid.png                  rows eta, columns beta, the source top left
    workdir/dac_sweep.json                  the record: parameters and every cell
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from . import __version__
from . import params as P
from .backend import DACBackend
from .edit import EditParams, EditSession, ProgressFactory
from .files import atomic_path, write_json
from .image import labelled_grid
from .params import check_values, parse_values  # noqa: F401  (parse_values re-exported: its first home)


@dataclass
class SweepCell:
    eta: float
    beta: float
    seed: int
    image: object  # PIL image
    path: str | None = None


@dataclass
class SweepResult:
    cells: list[SweepCell]
    grid: object  # PIL image
    grid_path: str
    record_path: str
    unet_lora_path: str
    text_lora_paths: dict[float, str]
    grid_boxes: dict[tuple[int, int], tuple[int, int]]  # (eta index, beta index) -> the cell's (left, top)


def _name(eta: float, beta: float, seed: int) -> str:
    return f"eta{eta:g}_beta{beta:g}_seed{seed}.png"


def sweep(
    image,
    params: EditParams,
    etas,
    betas,
    workdir: str | os.PathLike = "dac_work",
    backend: DACBackend | None = None,
    progress: ProgressFactory | None = None,
    checkpoint_every: int = 100,
) -> SweepResult:
    """Every (eta, beta) cell of a DAC edit of `image`: U once, Delta per eta, the images of
    each cell from the same seeds (params.seed + i for candidate i of params.batch_size).
    `params.eta` / `params.beta` are not used; `etas` / `betas` are. Returns the images with
    their settings; writes them, the grid and the record to `workdir`."""
    etas, betas = check_values(etas, P.ETA), check_values(betas, P.BETA)
    session = EditSession(image, params, workdir, backend, progress, checkpoint_every)
    unet = session.unet_stage()
    folder = os.path.join(session.workdir, "sweep")
    os.makedirs(folder, exist_ok=True)
    cells: list[SweepCell] = []
    for eta in etas:
        session.text_stage(eta)
        for beta in betas:
            for i, img in enumerate(session.sample(eta, beta, f"sampling eta={eta:g}, beta={beta:g}")):
                seed = params.seed + i
                cell = SweepCell(eta, beta, seed, img, os.path.join(folder, _name(eta, beta, seed)))
                with atomic_path(cell.path) as tmp:
                    img.save(tmp, format="PNG")
                cells.append(cell)
    by_setting = {(c.eta, c.beta): [d.image for d in cells if (d.eta, d.beta) == (c.eta, c.beta)] for c in cells}
    grid, boxes = labelled_grid(session.pil, f"source: {params.source_prompt}", [f"eta = {e:g}" for e in etas],
                            [f"beta = {b:g}" for b in betas], [[by_setting[(e, b)] for b in betas] for e in etas])
    grid_path = os.path.join(session.workdir, "sweep_grid.png")
    with atomic_path(grid_path) as tmp:
        grid.save(tmp, format="PNG")
    text_paths = {eta: os.path.abspath(session.text_stage(eta).path) for eta in etas}
    record = {
        "dac_version": __version__,
        "params": {k: v for k, v in dataclasses.asdict(params).items() if k not in ("eta", "beta")},
        "etas": etas,
        "betas": betas,
        "size": list(session.size),
        "unet_lora": os.path.abspath(unet.path),
        "text_loras": {f"{eta:g}": path for eta, path in text_paths.items()},
        "cells": [{"eta": c.eta, "beta": c.beta, "seed": c.seed, "image": os.path.abspath(c.path),
                   "text_lora": text_paths[c.eta]} for c in cells],
        "grid": os.path.abspath(grid_path),
        "device": str(session.backend.device),
    }
    record_path = os.path.join(session.workdir, "dac_sweep.json")
    write_json(record_path, record, indent=2, default=str)
    return SweepResult(cells, grid, grid_path, record_path, unet.path, text_paths, boxes)
