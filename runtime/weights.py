"""Weight sources: where a model's networks come from (tiny, random, a diffusers folder, a single file, the hub).

Every source ends in the same `ModelBundle`: torch modules plus tokenizers. `tiny` weights are built once
with a fixed seed, saved as a diffusers-format folder and then loaded through the folder code path, so
the tests exercise the same loading code real weights use.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .errors import WeightsNotFoundError
from .registry import ModelSpec, architectures
from .tokenizer import TEXT_ENCODER_TOKENIZERS, clip_tokenizer

log = logging.getLogger(__name__)

TINY_FORMAT_VERSION = 1
BUILT_IN_SOURCES = ("tiny", "random")


@dataclass
class ModelBundle:
    """The torch networks and tokenizers of one model, whatever source they were loaded from."""

    spec: ModelSpec
    source: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: dict[str, torch.nn.Module]
    tokenizers: dict[str, CLIPTokenizer]
    tiny_vae: AutoencoderTiny | None = None
    """The tiny decoder (TAESD / TAESDXL) for `vae: tiny`, where one is available (`load_tiny_vae`)."""

    def networks(self) -> dict[str, torch.nn.Module]:
        """Every torch network of the model by component name."""
        return {"unet": self.unet, "vae": self.vae, **self.text_encoders}


def cache_dir() -> Path:
    """Where sdaot keeps built tiny models (SDAOT_CACHE, else ~/.cache/sdaot)."""
    return Path(os.environ.get("SDAOT_CACHE", Path.home() / ".cache" / "sdaot"))


def _text_encoder_class(spec: ModelSpec, name: str) -> type[torch.nn.Module]:
    return CLIPTextModelWithProjection if spec.is_sdxl and name == "text_encoder_2" else CLIPTextModel


def build_random(spec: ModelSpec, size: str, seed: int | None = None) -> ModelBundle:
    """Instantiate the model's architecture (`size` = 'full' or 'tiny') with seeded random weights."""
    arch = architectures()
    torch.manual_seed(zlib.crc32(spec.hub_id.encode()) if seed is None else seed)
    unet = UNet2DConditionModel(**arch[spec.networks["unet"]][size])
    vae = AutoencoderKL(**arch[spec.networks["vae"]][size])
    encoders = {
        name: _text_encoder_class(spec, name)(CLIPTextConfig(**arch[spec.networks[name]][size]))
        for name in spec.text_encoders
    }
    tokenizers = built_in_tokenizers(spec)
    for module in (unet, vae, *encoders.values()):
        module.eval().requires_grad_(False)
    return ModelBundle(spec, f"{size}-random", unet, vae, encoders, tokenizers)


def built_in_tokenizers(spec: ModelSpec) -> dict[str, CLIPTokenizer]:
    """CLIP's tokenizer (shipped vocabulary) for each of the model's text encoders, with the model's pad token."""
    return {TEXT_ENCODER_TOKENIZERS[name]: clip_tokenizer(_pad(spec, name)) for name in spec.text_encoders}


def _pad(spec: ModelSpec, encoder_name: str) -> str:
    return spec.tokenizer_pads.get(TEXT_ENCODER_TOKENIZERS[encoder_name], "<|endoftext|>")


def save_diffusers_folder(bundle: ModelBundle, folder: Path, with_weights: bool = True) -> None:
    """Write a bundle as a diffusers-format folder (model_index.json, one subfolder per network).

    Without weights only the configs are written: enough for diffusers' single-file loader to know the
    architecture without asking the hub.
    """
    spec = bundle.spec
    for name, module in bundle.networks().items():
        if with_weights:
            module.save_pretrained(folder / name)
        elif hasattr(module, "save_config"):
            module.save_config(folder / name)
        else:
            module.config.save_pretrained(folder / name)
    for name, tok in bundle.tokenizers.items():
        tok.save_pretrained(folder / name)
    sched = dict(spec.scheduler_config)
    cls = sched.pop("_class_name")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": cls, **sched}, indent=2))
    pipeline = "StableDiffusionXLPipeline" if spec.is_sdxl else "StableDiffusionPipeline"
    if spec.refiner_only:
        pipeline = "StableDiffusionXLImg2ImgPipeline"
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", "scheduler": ["diffusers", cls]}
    index.update({"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    for name, module in bundle.text_encoders.items():
        index[name] = ["transformers", type(module).__name__]
    for name in bundle.tokenizers:
        index[name] = ["transformers", "CLIPTokenizer"]
    if spec.is_sdxl:
        index["force_zeros_for_empty_prompt"] = spec.force_zeros_for_empty_prompt
        index["requires_aesthetics_score"] = spec.requires_aesthetics_score
        for missing in ("text_encoder", "tokenizer"):
            index.setdefault(missing, [None, None])
    else:
        index.update({"safety_checker": [None, None], "feature_extractor": [None, None]})
        index["requires_safety_checker"] = False
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def build_once(folder: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """Return `folder`, first writing it with `write` into a temporary sibling and renaming it into place.

    Concurrent builders race harmlessly: the loser finds the folder complete (its `marker` file exists).
    """
    if not (folder / marker).exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
        try:
            write(tmp)
            try:
                tmp.rename(folder)
            except OSError:
                if not (folder / marker).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("built %s", folder)
    return folder


def tiny_folder(spec: ModelSpec) -> Path:
    """The diffusers folder of the model's tiny weights, built on first use and reused after."""
    folder = cache_dir() / f"tiny-v{TINY_FORMAT_VERSION}" / spec.hub_id.replace("/", "--")
    return build_once(folder, "model_index.json", lambda tmp: save_diffusers_folder(build_random(spec, "tiny"), tmp))


def load_diffusers_layout(spec: ModelSpec, location: str, source: str, local_only: bool = True) -> ModelBundle:
    """Load each network from a diffusers layout (`location` is a folder or, with local_only=False, a hub id)."""
    kwargs = {"local_files_only": local_only}
    unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", **kwargs)
    vae = AutoencoderKL.from_pretrained(location, subfolder="vae", **kwargs)
    encoders = {
        name: _text_encoder_class(spec, name).from_pretrained(location, subfolder=name, **kwargs)
        for name in spec.text_encoders
    }
    tokenizers = {}
    for name in encoders:
        tok_name = TEXT_ENCODER_TOKENIZERS[name]
        try:
            tokenizers[tok_name] = CLIPTokenizer.from_pretrained(location, subfolder=tok_name, **kwargs)
        except OSError:
            tokenizers[tok_name] = clip_tokenizer(_pad(spec, name))
    for module in (unet, vae, *encoders.values()):
        module.eval().requires_grad_(False)
    return ModelBundle(spec, source, unet, vae, encoders, tokenizers)


def load_single_file(spec: ModelSpec, path: Path) -> ModelBundle:
    """Load an original-format single-file checkpoint, using our full-size configs (no hub access needed)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory(prefix="sdaot-config-") as config_dir:
        with torch.device("meta"):
            skeleton = build_random(spec, "full")
        save_diffusers_folder(skeleton, Path(config_dir), with_weights=False)
        cls = StableDiffusionXLPipeline if spec.is_sdxl else StableDiffusionPipeline
        pipe = cls.from_single_file(str(path), config=config_dir, local_files_only=True)
    encoders = {name: getattr(pipe, name) for name in spec.text_encoders}
    tokenizers = built_in_tokenizers(spec)
    for module in (pipe.unet, pipe.vae, *encoders.values()):
        module.eval().requires_grad_(False)
    return ModelBundle(spec, f"file:{path}", pipe.unet, pipe.vae, encoders, tokenizers)


def tiny_vae_dir(explicit: Path | None = None) -> Path | None:
    """The tiny decoders' folder: --tiny-vae-dir, else SDAOT_TINY_VAE_DIR, else none."""
    if explicit is not None:
        return explicit
    env = os.environ.get("SDAOT_TINY_VAE_DIR")
    return Path(env) if env else None


def load_tiny_vae(spec: ModelSpec, source: str, folder: Path | None) -> AutoencoderTiny | None:
    """The model's tiny decoder: diffusers' AutoencoderTiny from `folder/<family>/` (TAESD for sd1/sd2, TAESDXL for
    sdxl), else, for the built-in weights, the architecture with seeded random weights; None otherwise (real
    weights with no tiny decoder given: a request for one is refused)."""
    if folder is not None and (folder / spec.family).is_dir():
        vae = AutoencoderTiny.from_pretrained(str(folder / spec.family), local_files_only=True)
    elif source in BUILT_IN_SOURCES:
        torch.manual_seed(zlib.crc32(f"{spec.family}-tiny-vae".encode()))
        vae = AutoencoderTiny(**architectures()[spec.networks["vae_tiny"]]["tiny" if source == "tiny" else "full"])
        spread_random_decoder_output(vae)
    else:
        return None
    return vae.eval().requires_grad_(False)


def spread_random_decoder_output(vae: AutoencoderTiny, mean: float = 0.5, std: float = 0.25) -> None:
    """Random TAESD weights decode every latent to one near-black image (the last layer's output is 0 +- 0.02), on
    which any two backends agree whatever their errors. Rescaling the last convolution per channel, once, so that
    seeded random latents decode to mid-grey +- a quarter makes a wrong value show (in tests and in the benchmark's
    PSNR) without changing the work."""
    last = vae.decoder.layers[-1]
    latents = torch.randn(1, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = (vae.decoder(latents) + 1) / 2
        got_mean, got_std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
        scale = std / got_std
        last.bias.copy_(mean - scale * (got_mean - last.bias))
        last.weight.mul_(scale.view(-1, 1, 1, 1))


def load_weights(spec: ModelSpec, source: str = "tiny", tiny_vae_folder: Path | None = None) -> ModelBundle:
    """Resolve a weight source string (tiny | random | folder | file.safetensors | hub[:id]) to a bundle, with the
    tiny decoder from `tiny_vae_folder` (default: SDAOT_TINY_VAE_DIR) where there is one."""
    bundle = _load_networks(spec, source)
    bundle.tiny_vae = load_tiny_vae(spec, source, tiny_vae_dir(tiny_vae_folder))
    return bundle


def _load_networks(spec: ModelSpec, source: str) -> ModelBundle:
    if source == "tiny":
        return load_diffusers_layout(spec, str(tiny_folder(spec)), "tiny")
    if source == "random":
        return build_random(spec, "full")
    if source == "hub" or source.startswith("hub:"):
        hub_id = source[4:] or spec.hub_id
        try:
            return load_diffusers_layout(spec, hub_id, f"hub:{hub_id}", local_only=False)
        except OSError as exc:
            raise WeightsNotFoundError(
                f"could not load {spec.name} from the hub ({hub_id}): {exc}. Download it where the hub is reachable "
                f"(`huggingface-cli download {hub_id} --local-dir DIR`) and pass --weights DIR",
                param="weights",
            ) from exc
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise WeightsNotFoundError(
                f"{path} is not a diffusers-format folder (no unet/ subfolder); expected the layout of {spec.hub_id}",
                param="weights",
            )
        return load_diffusers_layout(spec, str(path), f"folder:{path}")
    if path.is_file() and path.suffix in (".safetensors", ".ckpt"):
        return load_single_file(spec, path)
    raise WeightsNotFoundError(
        f"weights {source!r} for {spec.name} not found. Pass --weights tiny (built-in demo weights), "
        f"random (full-size architecture, for benchmarks), a diffusers folder (e.g. a download of {spec.hub_id}), "
        "a single-file .safetensors checkpoint, or hub[:ID] where the model hub is reachable",
        param="weights",
    )
