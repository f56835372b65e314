"""Builds ready-to-run pipelines from a model name and a weight source (used by the CLI and the server)."""

from __future__ import annotations

import logging
from pathlib import Path

import diffusers
import torch
import transformers

from .devices import pick_device
from .lora import lora_dir
from .pipeline import Pipeline
from .registry import get_model
from .weights import BUILT_IN_SOURCES, ModelBundle, load_weights

log = logging.getLogger(__name__)


def quiet_libraries() -> None:
    """Silence diffusers'/transformers' per-file progress bars and advice; sdaot reports its own progress."""
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def load_pipeline(model_name: str, weights: str = "tiny", with_refiner: bool = False,
                  refiner_weights: str | None = None, artifacts_root: Path | None = None,
                  lora_folder: Path | None = None, controlnet_folder: Path | None = None,
                  device: str = "cpu", tiny_vae_folder: Path | None = None) -> Pipeline:
    """Load a model's networks from `weights` onto `device` (cpu, cuda, auto: see devices.pick_device) and wrap
    them in a Pipeline (plus the SDXL refiner if asked); tiny decoders come from `tiny_vae_folder`."""
    quiet_libraries()
    spec = get_model(model_name)
    on = pick_device(device)
    refiner = None
    if with_refiner and spec.refiner:
        refiner_spec = get_model(spec.refiner)
        refiner_source = refiner_weights or _shared_source(weights, "refiner_weights")
        refiner = Pipeline(_on(load_weights(refiner_spec, refiner_source, tiny_vae_folder), on),
                           artifacts_root=artifacts_root)
    log.info("loading %s from %s weights onto %s", spec.name, weights, on)
    return Pipeline(_on(load_weights(spec, weights, tiny_vae_folder), on), refiner=refiner,
                    artifacts_root=artifacts_root, lora_folder=lora_dir(lora_folder),
                    controlnet_folder=controlnet_folder)


def _on(bundle: ModelBundle, device: torch.device) -> ModelBundle:
    """The bundle with its networks moved to `device` (in place; nothing moves on the CPU)."""
    for network in bundle.networks().values():
        network.to(device)
    if bundle.tiny_vae is not None:
        bundle.tiny_vae.to(device)
    return bundle


def _shared_source(weights: str, flag: str) -> str:
    """The refiner can share only a built-in source (tiny/random); a folder or file holds one model."""
    if weights in BUILT_IN_SOURCES:
        return weights
    from .errors import WeightsNotFoundError

    raise WeightsNotFoundError(
        f"enable_refiner needs the refiner's own weights; pass --{flag.replace('_', '-')} (a download of "
        "stabilityai/stable-diffusion-xl-refiner-1.0)",
        param=flag,
    )
