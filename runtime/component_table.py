"""The table of components: every network sdaot runs, compiles and benchmarks, one entry each.

An entry says whether the component is built once for every size or per resolution, how many batch rows it
gets for a request, which tokenizer feeds it, how its torch module is made from a model's weights and which
inputs trace it. `compile`, `bench`, the backend selection and the pipeline all read `COMPONENTS`; adding a
network (an IP-Adapter image encoder, say) is one entry here plus its module class in `components.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import nn

from .components import TextEncoderModule, UNetModule, VaeDecoderModule, VaeEncoderModule
from .deepcache import DEFAULT_BRANCH, CachedUNetModule, ShallowUNetModule
from .resolution import Resolution
from .tokenizer import TEXT_ENCODER_TOKENIZERS

if TYPE_CHECKING:
    from .registry import ModelSpec
    from .weights import ModelBundle

TOKENS = 77
"""CLIP's context length: every prompt is padded or cut to it, so text encoders are size-free."""

Modules = Mapping[str, nn.Module]
InputBuilder = Callable[["ModelBundle", "Resolution | None", int, Modules], tuple[torch.Tensor, ...]]


class BatchRule(Enum):
    """How many rows a component's batch has for a request of `images` images."""

    ONCE = "once"
    """One row whatever the request: a prompt's text encoder, the img2img source image's VAE encoder."""
    IMAGES = "images"
    """One row per image: the VAE decoder."""
    GUIDED = "guided"
    """One row per image, twice under classifier-free guidance: the denoiser and its ControlNet."""

    def rows(self, images: int, cfg: bool) -> int:
        """Batch rows for a request of `images` images, with or without classifier-free guidance."""
        if self is BatchRule.ONCE:
            return 1
        return images * 2 if cfg and self is BatchRule.GUIDED else images

    def compiled_batches(self, guided_batches: list[int]) -> list[int]:
        """The batch sizes `sdaot compile` builds: the requested ones for the denoiser, 1 for the rest (a
        compiled batch serves any multiple of itself)."""
        return guided_batches if self is BatchRule.GUIDED else [1]


@dataclass(frozen=True)
class ComponentSpec:
    """One network of the pipeline, as every module needs to know it."""

    name: str
    size_free: bool
    batch: BatchRule
    example_inputs: InputBuilder
    build: Callable[[ModelBundle], nn.Module | None] | None
    """Its torch module from the model's own weights (None where the model lacks that network); None for the
    ControlNet pair, built per request from the chosen ControlNet (`components.controlnet_modules`)."""
    tokenizer: str | None = None
    built_by_default: bool = True
    """Whether `sdaot compile` builds it when no --components are named (the tiny decoder and DeepCache's two
    UNets, for `DEFAULT_BRANCH`, are built on request)."""


def sdxl_time_ids(spec: ModelSpec, resolution: Resolution) -> tuple[list[float], list[float]]:
    """SDXL's added time ids (positive, negative): original size, crop corner and target size, or, for the
    refiner, an aesthetic score in place of the target size (6.0 and 2.5, as diffusers defaults)."""
    size = [float(resolution.height), float(resolution.width)]
    if spec.requires_aesthetics_score:
        return [*size, 0.0, 0.0, 6.0], [*size, 0.0, 0.0, 2.5]
    return [*size, 0.0, 0.0, *size], [*size, 0.0, 0.0, *size]


def _token_ids(bundle: ModelBundle, resolution: Resolution | None, batch: int, modules: Modules):
    return (torch.zeros(batch, TOKENS, dtype=torch.int64),)


def _latent_shape(bundle: ModelBundle, resolution: Resolution, batch: int) -> tuple[int, ...]:
    return (batch, bundle.unet.config.in_channels, *resolution.latent)


def _latents(bundle: ModelBundle, resolution: Resolution, batch: int, modules: Modules):
    return (torch.randn(_latent_shape(bundle, resolution, batch)),)


def _image(bundle: ModelBundle, resolution: Resolution, batch: int, modules: Modules):
    return (torch.randn(batch, 3, resolution.height, resolution.width),)


def _denoiser_inputs(bundle: ModelBundle, resolution: Resolution, batch: int, modules: Modules):
    unet = bundle.unet.config
    args = [torch.randn(_latent_shape(bundle, resolution, batch)), torch.full((batch,), 500.0),
            torch.randn(batch, TOKENS, unet.cross_attention_dim)]
    if unet.addition_embed_type == "text_time":
        time_ids = len(sdxl_time_ids(bundle.spec, resolution)[0])
        pooled = unet.projection_class_embeddings_input_dim - time_ids * unet.addition_time_embed_dim
        args += [torch.randn(batch, pooled), torch.randn(batch, time_ids)]
    return tuple(args)


def _controlnet_inputs(bundle: ModelBundle, resolution: Resolution, batch: int, modules: Modules):
    args = _denoiser_inputs(bundle, resolution, batch, modules)
    control = (torch.rand(batch, 3, resolution.height, resolution.width), torch.ones(batch))
    return (*args[:3], *control, *args[3:])


def _controlled_denoiser_inputs(bundle: ModelBundle, resolution: Resolution, batch: int, modules: Modules):
    controlnet_args = _controlnet_inputs(bundle, resolution, batch, modules)
    with torch.inference_mode():
        residuals = modules["controlnet"](*controlnet_args)
    return (*controlnet_args[:3], *controlnet_args[5:], *residuals)


def _shallow_denoiser_inputs(bundle: ModelBundle, resolution: Resolution, batch: int, modules: Modules):
    args = _denoiser_inputs(bundle, resolution, batch, modules)
    with torch.inference_mode():
        feature = modules["unet_cached"](*args)[1]
    return (*args, feature)


def _text_encoder(name: str) -> Callable[[ModelBundle], nn.Module | None]:
    def build(bundle: ModelBundle) -> nn.Module | None:
        encoder = bundle.text_encoders.get(name)
        return None if encoder is None else TextEncoderModule(encoder)

    return build


COMPONENTS: dict[str, ComponentSpec] = {spec.name: spec for spec in (
    ComponentSpec("unet", False, BatchRule.GUIDED, _denoiser_inputs, lambda b: UNetModule(b.unet)),
    ComponentSpec("unet_cached", False, BatchRule.GUIDED, _denoiser_inputs,
                  lambda b: CachedUNetModule(b.unet, DEFAULT_BRANCH), built_by_default=False),
    ComponentSpec("unet_shallow", False, BatchRule.GUIDED, _shallow_denoiser_inputs,
                  lambda b: ShallowUNetModule(b.unet, DEFAULT_BRANCH), built_by_default=False),
    ComponentSpec("vae_decoder", False, BatchRule.IMAGES, _latents, lambda b: VaeDecoderModule(b.vae)),
    ComponentSpec("vae_decoder_tiny", False, BatchRule.IMAGES, _latents,
                  lambda b: None if b.tiny_vae is None else VaeDecoderModule(b.tiny_vae), built_by_default=False),
    ComponentSpec("vae_encoder", False, BatchRule.ONCE, _image, lambda b: VaeEncoderModule(b.vae)),
    ComponentSpec("text_encoder", True, BatchRule.ONCE, _token_ids, _text_encoder("text_encoder"),
                  TEXT_ENCODER_TOKENIZERS["text_encoder"]),
    ComponentSpec("text_encoder_2", True, BatchRule.ONCE, _token_ids, _text_encoder("text_encoder_2"),
                  TEXT_ENCODER_TOKENIZERS["text_encoder_2"]),
    ComponentSpec("controlnet", False, BatchRule.GUIDED, _controlnet_inputs, None),
    ComponentSpec("unet_controlnet", False, BatchRule.GUIDED, _controlled_denoiser_inputs, None),
)}


def example_inputs(bundle: ModelBundle, name: str, resolution: Resolution | None, batch: int,
                   modules: Modules) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shape and dtype for tracing or timing one component (`modules` holds the
    ControlNet when the controlled UNet's residual inputs are needed)."""
    return COMPONENTS[name].example_inputs(bundle, resolution, batch, modules)


def component_modules(bundle: ModelBundle) -> dict[str, nn.Module]:
    """The torch module of each component the model's own weights make, keyed by component name."""
    built = {name: spec.build(bundle) for name, spec in COMPONENTS.items() if spec.build is not None}
    return {name: module for name, module in built.items() if module is not None}
