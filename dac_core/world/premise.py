"""Where DAC's premise holds: editability and fidelity as U fits the photo more firmly.

DAC rests on one observation about real models: a UNet LoRA U over-fitted to one photo makes
the model ignore the caption, and subtracting the text-encoder LoRA Delta restores the edit.
This runner measures that observation in the synthetic world as curves: for U fitted ever
more firmly (Abduction-1 steps, rank), per edit type and overall, the edit, keep and joint
success and the PSNR outside the objects of

- **Abduction-1 only**: U at full strength, then the target caption (the benchmark's);
- **DAC beta=b** for each beta (Delta trained `text_steps`, 40 by default), at each eta;
- **DAC, Delta = U's steps**: Delta trained for as many steps as U (beta 1), as the paper;
- **target prompt only**: the target caption without LoRAs (one point per case, no U).

plus, per source and U, how well U reproduces its photo (the source caption sampled with U
at full strength: PSNR outside the objects and whether the checker passes it).

Scores and thresholds are the benchmark's (`dac_core.world.bench.score`), untouched.

**Sharing.** Training is deterministic on the CPU and the learning rate is constant, so the
U of S steps is the state after step S of any longer run with the same seed: U is trained
once per (source, rank), to the largest step count, and snapshotted at every step count
asked for (one fit gives the U of each (source, steps, rank)), then shared by every case of
that source, every method, beta and eta. Delta likewise: once per (case, U, eta), to the
largest length needed, snapshotted at `text_steps` and at U's steps. `--cache DIR` keeps
every U and Delta as a LoRA file, so a re-run (another beta, the plot) trains nothing again.

    python -m dac_core.world.premise --json docs/premise/results.json --plot docs/premise/curves.png
    python -m dac_core.world.premise --plot-only docs/premise/results.json --plot docs/premise/curves.png

`--plot X.png` also writes X_by_edit.png (joint success per edit type).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import world as W
from ..backend import TEXT_DELTA, UNET
from ..demo import SETTINGS, model_path
from ..errors import DACError
from ..files import write_json
from ..image import image_to_tensor, tensor_to_images
from ..lora import load_lora, save_lora
from ..stages import TrainSettings, abduct_text_lora, abduct_unet_lora, counterfactual_sample
from . import bench as B

log = logging.getLogger("dac_core")

# name -> (what it is, cases of `per_type` sources). Each set is one or more sources, each
# edited once per edit type it admits.
CASE_SETS = {
    "default": ("the benchmark's default set (seed 0, two objects)", lambda k: W.default_cases(k, seed=0)),
    "seed1": ("the default set's generator at case seed 1 (two objects)", lambda k: W.default_cases(k, seed=1)),
    "one": ("one object per scene (no removal)", lambda k: W.default_cases(k, seed=0, n_objects=1)),
    "three": ("three objects per scene (no addition)", lambda k: W.default_cases(k, seed=0, n_objects=3)),
}
A1 = "Abduction-1 only"
TARGET_ONLY = "target prompt only"
DAC = "DAC"  # at a beta, Delta of text_steps
MATCHED = "DAC, Delta = U's steps"  # beta 1, Delta of as many steps as U


@dataclass
class Grid:
    """The points measured. `points`: the fits of U, (rank, Abduction-1 steps), in the order of
    the curves' x axis (U fitted ever more firmly); `matched`: the points at which DAC with
    Delta of as many steps as U also runs (at `matched_etas`). Every other method runs at
    every point, every eta and every beta."""

    points: list[tuple[int, int]] = field(default_factory=lambda: [(32, 200), (128, 200), (128, 600), (128, 1000)])
    etas: list[float] = field(default_factory=lambda: [0.8, 0.4])
    betas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0])
    matched: list[tuple[int, int]] = field(default_factory=lambda: [(128, 200)])
    matched_etas: list[float] = field(default_factory=lambda: [0.8])
    text_steps: int = SETTINGS["text_steps"]
    text_rank: int = SETTINGS["text_rank"]
    learning_rate: float = SETTINGS["learning_rate"]
    max_grad_norm: float = SETTINGS["max_grad_norm"]
    sample_steps: int = SETTINGS["sample_steps"]
    cfg: float = SETTINGS["cfg"]
    seeds: int = 1

    def steps_at(self, rank: int) -> list[int]:
        return sorted({s for r, s in self.points if r == rank})

    @property
    def ranks(self) -> list[int]:
        return list(dict.fromkeys(r for r, _ in self.points))


def full_rank(backend) -> int:
    """The largest rank any UNet LoRA layer of this model can use: max over the adapted
    layers of min(out, in x kernel), the widest layers' channel count (128 on the world model)."""
    return max(min(int(s[0]), int(np.prod(s[1:]))) for s in backend.lora_shapes(UNET).values())


class Snapshots:
    """A progress callback that keeps a copy of the LoRA being trained after each of `at` steps,
    with the wall seconds since the start."""

    def __init__(self, backend, name: str, at):
        self.backend, self.name, self.at = backend, name, set(at)
        self.loras: dict[int, object] = {}
        self.seconds: dict[int, float] = {}
        self.losses: list[float] = []
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, loss: float) -> None:
        self.losses.append(loss)
        if done in self.at:
            lora = self.backend.export_lora(self.name)
            lora.metadata["premise.loss_last_50"] = repr(float(np.mean(self.losses[-50:])))
            self.loras[done] = lora
            self.seconds[done] = time.perf_counter() - self.start


class Store:
    """U and Delta of every point, in memory and (with a folder) on disk, keyed by everything
    that makes them."""

    def __init__(self, folder: str | None, model: str):
        self.folder, self.model, self.memory = folder, model, {}

    def key(self, *parts) -> str:
        return hashlib.sha256(json.dumps([self.model, *parts], sort_keys=True).encode()).hexdigest()[:20]

    def get(self, key: str):
        if key not in self.memory and self.folder and os.path.isfile(os.path.join(self.folder, key + ".safetensors")):
            self.memory[key] = load_lora(os.path.join(self.folder, key + ".safetensors"))
        return self.memory.get(key)

    def put(self, key: str, lora, seconds: float) -> None:
        lora.metadata["premise.seconds"] = repr(seconds)
        self.memory[key] = lora
        if self.folder:
            os.makedirs(self.folder, exist_ok=True)
            save_lora(lora, os.path.join(self.folder, key + ".safetensors"))


def fit_unets(backend, store: Store, source: W.Scene, latents, g: Grid, rank: int, counter: dict) -> dict:
    """steps -> (U, wall seconds to reach it) for every step count of the grid at one rank:
    one Abduction-1 run to the largest, snapshotted (nothing trained if all are stored)."""
    keys = {s: store.key("unet", source.to_json(), s, rank, g.learning_rate, g.max_grad_norm)
            for s in g.steps_at(rank)}
    if any(store.get(k) is None for k in keys.values()):
        snap = Snapshots(backend, UNET, keys)
        train = TrainSettings(max(keys), g.learning_rate, rank, max_grad_norm=g.max_grad_norm)
        counter["unet"] = counter.get("unet", 0) + 1
        abduct_unet_lora(backend, latents, W.caption(source), train, progress=snap)
        for s, k in keys.items():
            store.put(k, snap.loras[s], snap.seconds[s])
    return {s: (store.get(k), float(store.get(k).metadata["premise.seconds"])) for s, k in keys.items()}


def fit_deltas(backend, store: Store, case: W.Case, latents, u, u_key: list, eta: float, lengths: list[int],
               g: Grid, counter: dict) -> dict:
    """length -> (Delta, wall seconds) for each length, for one case, U and eta: one
    Abduction-2 run to the longest, snapshotted."""
    keys = {n: store.key("delta", u_key, case.target_prompt, eta, n, g.text_rank, g.learning_rate,
                         g.max_grad_norm) for n in lengths}
    if any(store.get(k) is None for k in keys.values()):
        snap = Snapshots(backend, TEXT_DELTA, lengths)
        train = TrainSettings(max(lengths), g.learning_rate, g.text_rank, max_grad_norm=g.max_grad_norm)
        counter["delta"] = counter.get("delta", 0) + 1
        abduct_text_lora(backend, latents, case.target_prompt, u, train, eta=eta, progress=snap)
        for n, k in keys.items():
            store.put(k, snap.loras[n], snap.seconds[n])
    return {n: (store.get(k), float(store.get(k).metadata["premise.seconds"])) for n, k in keys.items()}


class Timed:
    """A function that adds up the wall seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t0


def sample(backend, prompt: str, u, delta, g: Grid, eta: float = 1.0, beta: float = 1.0) -> list:
    """One image per seed (0..seeds-1, one batch), as the benchmark samples."""
    return tensor_to_images(counterfactual_sample(
        backend, prompt, u, delta, (W.SIZE, W.SIZE), eta=eta, beta=beta, steps=g.sample_steps, cfg=g.cfg,
        seed=0, batch_size=g.seeds))


def scored(case: W.Case, images: list) -> dict:
    """Seed 0's scores (the benchmark's single-seed figures) and the best of the seeds."""
    scores = [B.score(case, image) for image in images]
    first = scores[0]
    return {"edit_ok": first.edit_ok, "keep": first.preserved, "joint": first.joint,
            "psnr": None if np.isnan(first.psnr) else round(first.psnr, 3),
            "best_joint": any(s.joint for s in scores)}


def run(backend, case_sets: dict[str, list[W.Case]], g: Grid, store: Store, on_source=None) -> dict:
    """Every point of the grid on every case; `on_source(results)` after each point of each
    source (to save what is done so far)."""
    results: dict = {"grid": asdict(g), "points": [], "fits": [], "deltas": [], "sampling": [], "counts": {}}
    counter = results["counts"]
    start = time.perf_counter()
    groups = []  # (set name, source, cases), in order; cases of a set share their source
    for name, cases in case_sets.items():
        for case in cases:
            if groups and groups[-1][0] == name and groups[-1][1] == case.source:
                groups[-1][2].append(case)
            else:
                groups.append((name, case.source, [case]))
    for k, (name, source, cases) in enumerate(groups):
        latents = backend.encode_image(image_to_tensor(W.render(source), (W.SIZE, W.SIZE)))
        common = {"set": name, "source": W.caption(source), "n_objects": len(source.objects)}
        for case in cases:  # the baseline without U: one point per case
            t0 = time.perf_counter()
            images = sample(backend, case.target_prompt, None, None, g)
            results["sampling"].append({**common, "what": TARGET_ONLY, "seconds": time.perf_counter() - t0})
            results["points"].append({**common, "edit": case.edit, "target": case.target_prompt, "method": TARGET_ONLY,
                                      "unet_steps": 0, "rank": 0, "eta": None, "beta": None, "text_steps": None,
                                      **scored(case, images)})
        unets = {rank: fit_unets(backend, store, source, latents, g, rank, counter) for rank in g.ranks}
        for rank, steps in g.points:
            u, seconds = unets[rank][steps]
            point = {**common, "unet_steps": steps, "rank": rank}
            u_key = [source.to_json(), steps, rank, g.learning_rate, g.max_grad_norm]
            timed_sample = Timed(sample)
            recon = timed_sample(backend, W.caption(source), u, None, g)[0]
            report = W.check(source, recon, reference=W.render(source), reference_scene=source)
            loss = round(float(u.metadata["premise.loss_last_50"]), 6)
            results["fits"].append({**point, "seconds": seconds, "loss_last_50": loss,
                                    "reconstruction_ok": report.all_ok, "reconstruction_psnr": _r(report.psnr)})
            for case in cases:
                row = {**point, "edit": case.edit, "target": case.target_prompt}
                images = timed_sample(backend, case.target_prompt, u, None, g, eta=1.0)  # U at full strength
                results["points"].append({**row, "method": A1, "eta": None, "beta": None, "text_steps": None,
                                          **scored(case, images)})
                for eta in g.etas:
                    matched = (rank, steps) in g.matched and eta in g.matched_etas
                    lengths = sorted({g.text_steps, steps} if matched else {g.text_steps})
                    deltas = fit_deltas(backend, store, case, latents, u, u_key, eta, lengths, g, counter)
                    results["deltas"].append({**row, "eta": eta, "seconds": {n: s for n, (_, s) in deltas.items()}})
                    delta = deltas[g.text_steps][0]
                    for beta in g.betas:
                        images = timed_sample(backend, case.target_prompt, u, delta, g, eta=eta, beta=beta)
                        results["points"].append({**row, "method": DAC, "eta": eta, "beta": beta,
                                                  "text_steps": g.text_steps, **scored(case, images)})
                    if matched:
                        images = timed_sample(backend, case.target_prompt, u, deltas[steps][0], g, eta=eta, beta=1.0)
                        results["points"].append({**row, "method": MATCHED, "eta": eta, "beta": 1.0,
                                                  "text_steps": steps, **scored(case, images)})
            results["sampling"].append({**point, "what": "every sample of the point", "seconds": timed_sample.seconds})
            results["seconds"] = time.perf_counter() - start
            if on_source is not None:
                on_source(results)  # what is done so far survives an interruption
        results["seconds"] = time.perf_counter() - start
        log.info("source %d/%d (%s, %d cases) done | %.0f s so far, about %.0f s left", k + 1, len(groups), name,
                 len(cases), results["seconds"], results["seconds"] / (k + 1) * (len(groups) - k - 1))
        if on_source is not None:
            on_source(results)
    return results


def _r(x):
    return None if x is None or not np.isfinite(x) else round(float(x), 3)


def label(p: dict) -> str:
    if p["method"] == DAC:
        return f"DAC beta={p['beta']:g}"
    return p["method"]


def summary(results: dict) -> list[dict]:
    """One row per (method, beta, U steps, rank, eta, case set or "all", edit type or
    "overall"): n and the rates of edit, keep, joint, best joint, and the mean PSNR."""
    groups: dict = {}
    for p in results["points"]:
        for case_set in (p["set"], "all"):
            for edit in (p["edit"], "overall"):
                key = (label(p), p["unet_steps"], p["rank"], p["eta"], p["text_steps"], case_set, edit)
                groups.setdefault(key, []).append(p)
    rows = []
    for (method, steps, rank, eta, text_steps, case_set, edit), ps in groups.items():
        psnrs = [p["psnr"] for p in ps if p["psnr"] is not None]
        rows.append({"method": method, "unet_steps": steps, "rank": rank, "eta": eta, "text_steps": text_steps,
                     "set": case_set, "edit": edit, "n": len(ps),
                     "edit_rate": _mean(p["edit_ok"] for p in ps), "keep": _mean(p["keep"] for p in ps),
                     "joint": _mean(p["joint"] for p in ps), "best_joint": _mean(p["best_joint"] for p in ps),
                     "psnr": round(float(np.mean(psnrs)), 2) if psnrs else None})
    return rows


def _mean(values) -> float:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else float("nan")


def point_name(rank: int, steps: int) -> str:
    return f"rank {rank}, {steps} steps"


def timing(results: dict) -> dict:
    """Wall seconds per point of the curves (rank, U steps), summed over sources and cases:
    U (its fit up to that step count; the snapshots of one fit overlap), Delta fits (each to
    its longest length), every sample at the point."""
    out: dict = {}
    for f in results["fits"]:
        out.setdefault(point_name(f["rank"], f["unet_steps"]), {"unet": 0.0, "delta": 0.0, "sampling": 0.0})
        out[point_name(f["rank"], f["unet_steps"])]["unet"] += f["seconds"]
    for d in results["deltas"]:
        out[point_name(d["rank"], d["unet_steps"])]["delta"] += max(d["seconds"].values())
    for s in results["sampling"]:
        if s["what"] != TARGET_ONLY:
            out[point_name(s["rank"], s["unet_steps"])]["sampling"] += s["seconds"]
    return {k: {n: round(v, 1) for n, v in parts.items()} for k, parts in out.items()}


def table(results: dict, case_set: str = "all") -> str:
    """Overall rates per point: method, U steps, rank, eta."""
    rows = [r for r in summary(results) if r["set"] == case_set and r["edit"] == "overall"]
    rows.sort(key=lambda r: (r["rank"], r["unet_steps"], r["eta"] or 0, r["method"]))
    lines = [f"{'method':<26}{'U steps':>8}{'rank':>6}{'eta':>6}{'n':>5}{'edit':>7}{'keep':>7}{'joint':>7}{'PSNR':>7}"]
    for r in rows:
        eta = "" if r["eta"] is None else f"{r['eta']:g}"
        psnr = "" if r["psnr"] is None else f"{r['psnr']:.1f}"
        lines.append(f"{r['method']:<26}{r['unet_steps']:>8}{r['rank']:>6}{eta:>6}{r['n']:>5}{r['edit_rate']:>7.2f}"
                     f"{r['keep']:>7.2f}{r['joint']:>7.2f}{psnr:>7}")
    return "\n".join(lines)


METRICS = (("edit_rate", "edit success"), ("keep", "keep success"), ("joint", "joint success"),
           ("psnr", "PSNR outside the objects (dB)"))


def _style(g: dict, plt) -> tuple[list[str], dict]:
    methods = [A1] + [f"DAC beta={b:g}" for b in g["betas"]] + [MATCHED]
    colours = {A1: "black", MATCHED: "tab:red"}
    cmap = plt.get_cmap("viridis")
    for k, b in enumerate(g["betas"]):
        colours[f"DAC beta={b:g}"] = cmap(0.1 + 0.75 * k / max(1, len(g["betas"]) - 1))
    return methods, colours


def _axis(ax, g: dict) -> None:
    ax.set_xticks(range(len(g["points"])))
    ax.set_xticklabels([f"r{r}\n{s}" for r, s in g["points"]], fontsize=8)
    ax.grid(alpha=0.3)


def plot(results: dict, path: str) -> None:
    """The curves: rows = metrics, columns = etas; x = the points (rank, U steps) in the
    grid's order; one line per method, every case of every set together. matplotlib is a
    benchmark-only dependency (the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = results["grid"]
    points = [tuple(p) for p in g["points"]]
    rows = [r for r in summary(results) if r["set"] == "all" and r["edit"] == "overall"]
    methods, colours = _style(g, plt)
    fig, axes = plt.subplots(len(METRICS), len(g["etas"]), figsize=(5.2 * len(g["etas"]), 2.5 * len(METRICS)),
                             sharex=True, squeeze=False)
    target = next((r for r in rows if r["method"] == TARGET_ONLY), None)
    for j, eta in enumerate(g["etas"]):
        for i, (metric, name) in enumerate(METRICS):
            ax = axes[i][j]
            for method in methods:
                at = {(r["rank"], r["unet_steps"]): r[metric] for r in rows
                      if r["method"] == method and (r["eta"] == eta or method == A1) and r[metric] is not None}
                xs = [k for k, pt in enumerate(points) if pt in at]
                if xs:
                    ax.plot(xs, [at[points[k]] for k in xs], marker="o" if method != MATCHED else "D", ms=4,
                            color=colours[method], label=method + (" (any eta)" if method == A1 else ""),
                            lw=2.4 if method == A1 else 1.4, ls="--" if method == A1 else "-",
                            zorder=3 if method == A1 else 2)
            if target is not None and target[metric] is not None:
                ax.axhline(target[metric], color="gray", ls=":", lw=1.2, label=TARGET_ONLY + " (no U)")
            if metric == "psnr":
                recon = [np.mean([f["reconstruction_psnr"] for f in results["fits"]
                                  if (f["rank"], f["unet_steps"]) == pt and f["reconstruction_psnr"] is not None]
                                 or [np.nan]) for pt in points]
                ax.plot(range(len(points)), recon, color="tab:orange", ls="-.", lw=1.2, marker="x", ms=5,
                        label="U alone, source caption (fidelity of U)")
                ax.axhline(B.PSNR_MIN, color="tab:orange", lw=0.7, alpha=0.5)
            else:
                ax.set_ylim(-0.04, 1.04)
            _axis(ax, g)
            if i == 0:
                ax.set_title(f"eta {eta:g} (DAC's annealing of U)", fontsize=10)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
            if i == len(METRICS) - 1:
                ax.set_xlabel(f"U: rank and Abduction-1 steps (lr {g['learning_rate']:g})", fontsize=9)
    n_cases = len({(p["set"], p["target"]) for p in results["points"]})
    handles, labels = axes[-1][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    fig.suptitle(f"World model, {n_cases} cases ({', '.join(results.get('sets', {}))}), seed 0: lr "
                 f"{g['learning_rate']:g}, Delta {g['text_steps']} steps (red: as many as U, beta 1)", fontsize=10)
    fig.tight_layout(rect=(0, 0.075, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_by_edit(results: dict, path: str, eta: float | None = None) -> None:
    """Joint success per edit type (one panel each) against the points, at one eta (the first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = results["grid"]
    eta = g["etas"][0] if eta is None else eta
    points = [tuple(p) for p in g["points"]]
    rows = [r for r in summary(results) if r["set"] == "all"]
    methods, colours = _style(g, plt)
    edits = [e for e in W.EDIT_TYPES if any(r["edit"] == e for r in rows)]
    fig, axes = plt.subplots(2, (len(edits) + 1) // 2, figsize=(4.2 * ((len(edits) + 1) // 2), 6), sharex=True,
                             sharey=True, squeeze=False)
    for k, edit in enumerate(edits):
        ax = axes.flat[k]
        for method in methods:
            at = {(r["rank"], r["unet_steps"]): (r["joint"], r["n"]) for r in rows
                  if r["edit"] == edit and r["method"] == method and (r["eta"] == eta or method == A1)}
            xs = [i for i, pt in enumerate(points) if pt in at]
            if xs:
                ax.plot(xs, [at[points[i]][0] for i in xs], marker="o", ms=4, color=colours[method], label=method,
                        lw=2.4 if method == A1 else 1.4, ls="--" if method == A1 else "-")
        n = next((r["n"] for r in rows if r["edit"] == edit and r["method"] == A1), 0)
        ax.set_title(f"{edit} ({n} cases)", fontsize=10)
        ax.set_ylim(-0.04, 1.04)
        _axis(ax, g)
    axes[0][0].set_ylabel("joint success")
    axes[1][0].set_ylabel("joint success")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8.5, frameon=False)
    fig.suptitle(f"Joint success per edit type, eta {eta:g}, seed 0", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def merge(parts: list[dict]) -> dict:
    """One result of several runs (other case sets run side by side, one process per core, or
    other points, etas or betas): the lists joined (a point or a fit that two runs share once),
    the grid the union of the grids (a point of the curves is only where a run measured it),
    each run's grid and times under "runs"."""
    if len(parts) == 1:
        return parts[0]
    out = {k: v for k, v in parts[0].items() if k not in ("summary", "timing")}
    for key in ("deltas", "sampling"):  # time spent: all of it counts
        out[key] = [x for r in parts for x in r[key]]
    # a point or fit measured by two runs (the target prompt alone, U from the cache) counts once
    for key, ident in (("points", ("set", "source", "target", "method", "unet_steps", "rank", "eta", "beta",
                                   "text_steps")),
                       ("fits", ("set", "source", "unet_steps", "rank"))):
        seen: dict = {}
        for x in (x for r in parts for x in r[key]):
            seen.setdefault(json.dumps([x[k] for k in ident]), x)
        out[key] = list(seen.values())
    grid = dict(parts[0]["grid"])
    for key in ("points", "etas", "betas", "matched", "matched_etas"):
        grid[key] = list(dict.fromkeys(tuple(x) if isinstance(x, list) else x for r in parts for x in r["grid"][key]))
    out["grid"] = grid
    out["counts"] = {k: sum(r["counts"].get(k, 0) for r in parts) for k in ("unet", "delta")}
    out["sets"] = {k: v for r in parts for k, v in r["sets"].items()}
    out["runs"] = [{k: r.get(k) for k in ("sets", "grid", "wall_seconds", "cpu_seconds", "environment")}
                   for r in parts]
    out["cpu_seconds"] = sum(r["cpu_seconds"] for r in parts)
    out["wall_seconds"] = max(r["wall_seconds"] for r in parts)  # the longest run (they ran side by side)
    out["wall_seconds_sum"] = sum(r["wall_seconds"] for r in parts)
    return out | {"summary": summary(out), "timing": timing(out)}


def _points(text: str, full: int) -> list[tuple[int, int]]:
    """"32:200,full:600" -> [(32, 200), (full, 600)]."""
    out = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        rank, _, steps = part.partition(":")
        out.append((full if rank == "full" else int(rank), int(steps)))
    return out


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Grid()
    p.add_argument("--model", default=None, help="world model folder (default: the shipped one)")
    p.add_argument("--sets", default=",".join(CASE_SETS),
                   help="case sets, comma-separated, of: " + "; ".join(f"{k}: {v[0]}" for k, v in CASE_SETS.items()))
    p.add_argument("--per-type", type=int, default=1, help="sources per case set (default 1)")
    p.add_argument("--edits", default=",".join(W.EDIT_TYPES), help="edit types to keep (default: all)")
    p.add_argument("--points", default="32:200,full:200,full:600,full:1000",
                   help="the fits of U, rank:steps, comma-separated, in the curves' order; rank 'full' = the UNet's "
                        "full rank (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="learning rate of both abductions (%(default)s)")
    p.add_argument("--text-steps", type=int, default=d.text_steps, help="Delta's steps for DAC (%(default)s)")
    p.add_argument("--etas", default=",".join(map(str, d.etas)), help="etas (default %(default)s)")
    p.add_argument("--betas", default=",".join(map(str, d.betas)), help="betas (default %(default)s)")
    p.add_argument("--matched", default="full:200",
                   help="points (rank:steps) at which DAC with Delta of as many steps as U runs; empty: none "
                        "(default %(default)s)")
    p.add_argument("--matched-etas", default=",".join(map(str, d.matched_etas)),
                   help="etas of that method (default %(default)s)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="sampling seeds (default %(default)s)")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps (default %(default)s)")
    p.add_argument("--cache", help="folder that keeps every U and Delta (reused on a re-run)")
    p.add_argument("--json", help="write every point here (after each source, and at the end)")
    p.add_argument("--plot", help="write the curves here (PNG; needs matplotlib)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--note", help="with --plot-only and --json: a note on how the runs were made, kept in the JSON")
    p.add_argument("--plot-only", metavar="JSON[,JSON]",
                   help="run nothing: merge these results (runs of other case sets, same grid), print the table, "
                        "and write --plot and --json from them")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.plot_only:
        results = merge([_load(path) for path in args.plot_only.split(",")])
        if args.note:
            results["note"] = args.note
        print(table(results))
        if args.json and args.json not in args.plot_only.split(","):
            write_json(args.json, results)
        if args.plot:
            plot(results, args.plot)
            plot_by_edit(results, _by_edit(args.plot))
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    unknown = [s for s in args.sets.split(",") if s not in CASE_SETS]
    if unknown:
        p.error(f"--sets: unknown {', '.join(unknown)}; known: {', '.join(CASE_SETS)}")
    edits = [e.strip() for e in args.edits.split(",") if e.strip()]
    if not edits or set(edits) - set(W.EDIT_TYPES):
        p.error(f"--edits: give some of {', '.join(W.EDIT_TYPES)}")
    try:
        model = args.model or model_path()
    except DACError as e:
        p.error(str(e))
    from ..diffusers_backend import DiffusersBackend

    backend = DiffusersBackend.from_model(model, device="cpu")
    rank_full = full_rank(backend)
    g = Grid(points=_points(args.points, rank_full), etas=_floats(args.etas), betas=_floats(args.betas),
             matched=_points(args.matched, rank_full),
             matched_etas=_floats(args.matched_etas), text_steps=args.text_steps, learning_rate=args.lr,
             seeds=args.seeds, sample_steps=args.sample_steps)
    case_sets = {s: [c for c in CASE_SETS[s][1](args.per_type) if c.edit in edits] for s in args.sets.split(",")}
    store = Store(args.cache, os.path.basename(os.path.normpath(model)))
    meta = {"model": os.path.basename(os.path.normpath(model)), "full_rank": rank_full,
            "environment": B.environment("cpu"), "sets": {s: CASE_SETS[s][0] for s in case_sets}}
    wall, cpu = time.perf_counter(), time.process_time()

    def save(results):
        results.update(meta, cpu_seconds=time.process_time() - cpu, wall_seconds=time.perf_counter() - wall)
        if args.json:
            write_json(args.json, results | {"summary": summary(results), "timing": timing(results)})

    results = run(backend, case_sets, g, store, on_source=save)
    save(results)
    print(table(results))
    print(f"{len(results['points'])} points, {results['wall_seconds'] / 60:.1f} min wall, "
          f"{results['cpu_seconds'] / 60:.1f} min CPU; {results['environment']}")
    if args.plot:
        plot(results, args.plot)
        plot_by_edit(results, _by_edit(args.plot))


def _by_edit(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}_by_edit{ext or '.png'}"


if __name__ == "__main__":
    main()
