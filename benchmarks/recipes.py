"""`sdaot bench --recipes`: time to image. A CPU user counts seconds per finished image, not per UNet call, so
each recipe (a model, a size and the request fields that make it fast or slow) is timed whole: text encoders,
every sampler step and the decoder, through the same pipeline and the same diffusers scheduler.

Each recipe runs on three backends, one after the other, each in a fresh pipeline that is dropped before the
next (a compiled UNet holds its own copy of the weights):
- `sdaot`: the request's `backend: auto`, on the artifacts under --artifacts (torch where none fits);
- `openvino`: every network the recipe calls is converted by OpenVINO's PyTorch frontend and run at OpenVINO's
  default precision (peers.py), the rest of the pipeline unchanged;
- `torch`: eager torch, the reference: every other backend's image is held against torch's (PSNR).

A row is the median of `repeat` images after a warm-up image of at most WARMUP_STEPS steps (which builds or
loads every network the recipe calls, at its shapes: its time is the row's `setup_s`), the process's RSS after
them, and the PSNR of its image against torch's of the same recipe and seed.
"""

from __future__ import annotations

import ctypes
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from PIL import Image

from sdaot.runtime.artifacts import resolution_key
from sdaot.runtime.compiled import release_tvm_pool
from sdaot.runtime.component_table import COMPONENTS, example_inputs
from sdaot.runtime.components import Component, TorchComponent
from sdaot.runtime.pipeline import Pipeline
from sdaot.runtime.planning import Plan
from sdaot.runtime.registry import get_model
from sdaot.runtime.request import parse_request
from sdaot.runtime.weights import ModelBundle, load_weights

from .peers import OpenVinoPeer
from .report import machine_line
from .runner import QUALITY_GATE_DB, QUALITY_PROMPT, image_psnr

WARMUP_STEPS = 2
"""Enough steps for the warm-up image to call every network of a recipe (DeepCache's full and shallow UNets)."""
RECIPE_BACKENDS = ("sdaot", "openvino", "torch")
"""The backends every recipe runs on; torch last, as the reference the others are held against."""


@dataclass(frozen=True)
class Recipe:
    """One way of making an image: a model at a size, and the request fields that choose the work."""

    name: str
    model: str
    size: str
    fields: dict[str, Any]


RECIPES = (
    Recipe("sd15-euler-20", "SD1.5", "512x512", {"sampler": "Euler", "steps": 20}),
    *(Recipe(f"sd15-euler-20-deepcache-{n}", "SD1.5", "512x512", {"sampler": "Euler", "steps": 20,
                                                                  "deepcache_interval": n}) for n in (2, 3, 5)),
    Recipe("sd15-lcm-4", "SD1.5", "512x512", {"sampler": "LCM", "steps": 4, "cfg_scale": 1.0}),
    Recipe("sd15-lcm-4-tiny-vae", "SD1.5", "512x512", {"sampler": "LCM", "steps": 4, "cfg_scale": 1.0,
                                                       "vae": "tiny"}),
    Recipe("sdxl-turbo-1-tiny-vae", "SDXL-turbo", "512x512", {"steps": 1, "cfg_scale": 0.0, "vae": "tiny"}),
)
"""The recipes of issue 24 (DeepCache at the intervals whose speed-up it asks for). LCM runs without its LoRA: a
merged LoRA changes the weights' values, not the work."""

RECIPE_NAMES = {recipe.name: recipe for recipe in RECIPES}


@dataclass
class RecipeRow:
    """One recipe on one backend."""

    recipe: str
    backend: str
    status: str
    seconds_per_image: float | None = None
    runs: list[float] = field(default_factory=list)
    setup_s: float | None = None
    rss_mb: float | None = None
    psnr_db: float | None = None
    networks: dict[str, str] = field(default_factory=dict)
    ratio_to_fastest_peer: float | None = None


class OpenVinoPipeline(Pipeline):
    """The pipeline with every network the plan calls run by OpenVINO at its default precision: the torch module
    converted by OpenVINO's PyTorch frontend at the plan's shapes (peers.py), built on first use and kept."""

    def __init__(self, bundle: ModelBundle) -> None:
        super().__init__(bundle)
        self._built: dict[tuple[str, str, int], OpenVinoPeer] = {}

    def components(self, plan: Plan) -> dict[str, Component]:
        """What torch would run for this plan, each network swapped for its OpenVINO build."""
        chosen = super().components(plan)
        modules = {name: c.module for name, c in chosen.items() if isinstance(c, TorchComponent)}
        return {name: self._peer(name, modules, plan) for name in chosen}

    def _peer(self, name: str, modules: dict[str, torch.nn.Module], plan: Plan) -> OpenVinoPeer:
        spec = COMPONENTS[name]
        resolution = None if spec.size_free else plan.resolution
        rows = spec.batch.rows(len(plan.seeds), plan.do_cfg)
        key = (name, resolution_key(resolution), rows)
        if key not in self._built:
            inputs = example_inputs(self.bundle, name, resolution, rows, modules)
            self._built[key] = OpenVinoPeer.from_torch(modules[name], inputs)
        return self._built[key]


def recipe_pipeline(bundle: ModelBundle, backend: str, artifacts_root: Path | None) -> Pipeline:
    """A fresh pipeline for one backend's rows."""
    if backend == "openvino":
        return OpenVinoPipeline(bundle)
    return Pipeline(bundle, artifacts_root=artifacts_root if backend == "sdaot" else None)


def time_recipe(pipe: Pipeline, recipe: Recipe, backend: str, repeat: int,
                log: Callable[[str], None]) -> tuple[RecipeRow, Image.Image | None]:
    """A short warm-up image, then `repeat` timed ones (wall time of the whole generation); the row and its
    image."""
    width, height = (int(side) for side in recipe.size.split("x"))
    fields = {"model_name": recipe.model, "prompt": QUALITY_PROMPT, "width": width, "height": height, "seed": 0,
              "backend": "torch" if backend == "torch" else "auto", **recipe.fields}
    request = parse_request(fields)
    try:
        start = time.perf_counter()
        pipe.generate(parse_request(fields | {"steps": min(fields["steps"], WARMUP_STEPS)}))
        setup = time.perf_counter() - start
        runs = []
        for _ in range(repeat):
            start = time.perf_counter()
            result = pipe.generate(request)
            runs.append(time.perf_counter() - start)
    except Exception as exc:  # a backend that cannot run a recipe is reported in its row; the others go on
        return RecipeRow(recipe.name, backend, " ".join(f"failed: {type(exc).__name__}: {exc}".split())[:300]), None
    row = RecipeRow(recipe.name, backend, "ok", round(statistics.median(runs), 3), [round(r, 3) for r in runs],
                    round(setup, 2), round(psutil.Process().memory_info().rss / 2**20), networks=dict(result.backends))
    log(f"  {recipe.name} on {backend}: {row.seconds_per_image:.2f} s per image (warm-up {row.setup_s:.1f} s), "
        f"RSS {row.rss_mb} MB")
    return row, result.images[0]


def run_recipes(recipes: list[Recipe], weights: str, artifacts_root: Path | None, repeat: int, out_dir: Path,
                log: Callable[[str], None] = print, backends: tuple[str, ...] = RECIPE_BACKENDS) -> dict:
    """Every recipe on every backend; JSON and Markdown into out_dir, written again after each row (a run killed
    part way, say for memory, keeps what it measured)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"weights": weights, "repeat": repeat, "machine": machine_line(), "gate_db": QUALITY_GATE_DB,
              "prompt": QUALITY_PROMPT, "recipes": {r.name: asdict(r) for r in recipes}, "backends": list(backends),
              "rows": []}
    done: list[RecipeRow] = []
    bundles: dict[str, ModelBundle] = {}
    for recipe in recipes:
        if recipe.model not in bundles:
            bundles.clear()
            release_memory()
            bundles[recipe.model] = load_weights(get_model(recipe.model), weights)
        images: dict[str, Image.Image] = {}
        mine: list[RecipeRow] = []
        for backend in backends:
            log(f"{recipe.name} on {backend} ...")
            pipe = recipe_pipeline(bundles[recipe.model], backend, artifacts_root)
            row, image = time_recipe(pipe, recipe, backend, repeat, log)
            del pipe
            release_memory()
            if image is not None:
                images[backend] = image
                image.save(out_dir / f"{recipe.name}-{backend}.png")
            mine.append(row)
            score_recipe(mine, images)
            report["rows"] = [asdict(r) for r in done + mine]
            (out_dir / f"time-to-image-{weights}.json").write_text(json.dumps(report, indent=2))
            (out_dir / f"time-to-image-{weights}.md").write_text(recipes_markdown(report))
        done.extend(mine)
    return report


def release_memory() -> None:
    """Collect the dropped pipeline and hand what it held back to the system: TVM's buffer pool, and the freed
    heap glibc keeps in its arenas (blocks under 32 MB, most weight tensors). Without both, each row's RSS
    carries the rows before it and SDXL's weights, loaded after SD1.5's rows, find the machine full."""
    gc.collect()
    release_tvm_pool()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def score_recipe(rows: list[RecipeRow], images: dict[str, Image.Image]) -> None:
    """Each row's PSNR against torch's image (once torch has run) and its speed against the fastest peer."""
    peers = [r.seconds_per_image for r in rows if r.backend != "sdaot" and r.seconds_per_image]
    for row in rows:
        if row.backend in images and "torch" in images:
            row.psnr_db = round(min(image_psnr(images[row.backend], images["torch"]), 99.0), 2)
        if row.seconds_per_image and peers:
            row.ratio_to_fastest_peer = round(min(peers) / row.seconds_per_image, 3)


def recipes_markdown(report: dict) -> str:
    """The time-to-image table: seconds per image per recipe and backend, sdaot's speed-up over the fastest
    peer, RSS and PSNR against torch."""
    lines = [f"### Time to image ({report['weights']} weights)", "",
             f"Machine: {report['machine']}. A warm-up image of at most {WARMUP_STEPS} steps (builds and loads "
             f"every network: `setup s`), then the median of {report['repeat']} whole images.", "",
             "| recipe | backend | s per image | fastest peer / this | RSS MB | PSNR vs torch dB | setup s |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['recipe']} | {row['backend']} | {row['status']} | | | | |")
            continue
        ratio = f"{row['ratio_to_fastest_peer']:.2f}x" if row["ratio_to_fastest_peer"] else ""
        psnr = "" if row["backend"] == "torch" or row["psnr_db"] is None else f"{row['psnr_db']:.1f}"
        lines.append(f"| {row['recipe']} | {row['backend']} | {row['seconds_per_image']:.2f} | {ratio} | "
                     f"{row['rss_mb']} | {psnr} | {row['setup_s']:.1f} |")
    return "\n".join(lines) + "\n"
