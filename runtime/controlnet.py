"""ControlNet: the registry of names, the control-map preprocessors, and ControlNet weights per model.

A ControlNet has the same architecture for every name within a family (only its weights differ), so one
compiled `controlnet` artifact serves canny, depth, ... alike: the weights are its inputs.
"""

from __future__ import annotations

import logging
import os
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel
from PIL import Image

from .errors import InvalidRequestError, WeightsNotFoundError
from .registry import ModelSpec, read_data
from .weights import TINY_FORMAT_VERSION, ModelBundle, build_once, cache_dir

log = logging.getLogger(__name__)


@cache
def controlnet_registry() -> dict[str, dict]:
    """Every ControlNet name with its preprocessor and real-weight hub ids per family."""
    return read_data("controlnets.json")["controlnets"]


def get_controlnet_name(name: str) -> str:
    """The canonical ControlNet name; unknown names list the valid ones."""
    folded = {k.lower(): k for k in controlnet_registry()}
    if name.strip().lower() not in folded:
        raise InvalidRequestError(f"unknown controlnet_name {name!r}; valid: {', '.join(controlnet_registry())}",
                                  param="controlnet_name")
    return folded[name.strip().lower()]


def preprocess_control_image(name: str, image: Image.Image) -> Image.Image:
    """Turn the request's controlnet_image into the control map (canny edges here; others come prepared)."""
    if controlnet_registry()[name]["preprocessor"] != "canny":
        return image.convert("RGB")
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("L")), 100, 200)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _init_tiny(controlnet: ControlNetModel, seed: int) -> None:
    """Give the zero-initialised output convolutions (and the control-map encoder) strong random values,
    so that a tiny ControlNet visibly follows its control image."""
    gen = torch.Generator().manual_seed(seed)
    embedding = controlnet.controlnet_cond_embedding
    outputs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    encoder = [embedding.conv_in, *embedding.blocks, embedding.conv_out]
    with torch.no_grad():
        for conv, std in [(c, 0.2) for c in outputs] + [(c, 0.15) for c in encoder]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.05)


def _build(bundle: ModelBundle, size: str, name: str) -> ControlNetModel:
    channels = tuple(read_data("controlnets.json")["conditioning_embedding_out_channels"][size])
    torch.manual_seed(zlib.crc32(f"{bundle.spec.hub_id}/{name}".encode()))
    controlnet = ControlNetModel.from_unet(bundle.unet, conditioning_embedding_out_channels=channels)
    if size == "tiny":
        _init_tiny(controlnet, zlib.crc32(name.encode()))
    return controlnet


def _tiny_folder(bundle: ModelBundle, name: str) -> Path:
    model = bundle.spec.hub_id.replace("/", "--")
    folder = cache_dir() / f"tiny-v{TINY_FORMAT_VERSION}" / f"{model}--controlnet-{name}"
    return build_once(folder, "config.json", lambda tmp: _build(bundle, "tiny", name).save_pretrained(tmp))


def controlnet_dir(explicit: Path | None = None) -> Path | None:
    """The folder of ControlNet downloads: --controlnet-dir, else SDAOT_CONTROLNET_DIR, else none."""
    if explicit is not None:
        return explicit
    env = os.environ.get("SDAOT_CONTROLNET_DIR")
    return Path(env) if env else None


def load_controlnet(bundle: ModelBundle, name: str, folder: Path | None = None) -> ControlNetModel:
    """The ControlNet `name` for this model, from the same kind of source as the model's weights."""
    spec: ModelSpec = bundle.spec
    hub_id = controlnet_registry()[name]["hub_ids"]["sdxl" if spec.is_sdxl else "sd1"]
    if bundle.source == "tiny":
        model = ControlNetModel.from_pretrained(str(_tiny_folder(bundle, name)), local_files_only=True)
    elif bundle.source == "full-random":
        model = _build(bundle, "full", name)
    else:
        root = controlnet_dir(folder)
        location = root / name if root else None
        if location is None or not (location / "config.json").exists():
            raise WeightsNotFoundError(
                f"no weights for ControlNet {name!r}: download {hub_id} into <dir>/{name} and pass "
                "--controlnet-dir <dir> (or SDAOT_CONTROLNET_DIR)", param="controlnet_name")
        model = ControlNetModel.from_pretrained(str(location), local_files_only=True)
    return model.eval().requires_grad_(False)
