"""The Component interface: every network call of the pipeline goes through one, whatever runs it.

A component takes positional tensors named by `input_names` and returns a tuple of tensors named by
`output_names`. The torch modules below fix those signatures; the same modules are what the compiler
exports, so the torch, onnxruntime and tvm backends of a component compute the same function. Which module
each component uses, and everything else about it, is in `component_table.COMPONENTS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from .weights import ModelBundle


class Component(Protocol):
    """A network the pipeline calls: a name, the backend that runs it, and a call on tensors."""

    name: str
    backend: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


class TextEncoderModule(nn.Module):
    """CLIP text encoder: token ids -> (final-norm hidden state, penultimate layer output, pooled embedding)."""

    input_names = ("input_ids",)
    output_names = ("last_hidden_state", "penultimate_hidden_state", "pooled")

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids, output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


class UNetModule(nn.Module):
    """Denoiser: (latents, timestep per sample, text embeddings[, pooled text, time ids]) -> noise prediction."""

    output_names = ("noise_pred",)

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.sdxl = unet.config.addition_embed_type == "text_time"
        base = ("sample", "timestep", "encoder_hidden_states")
        self.input_names = base + (("text_embeds", "time_ids") if self.sdxl else ())

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        out = self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
        return (out,)


class ControlNetModule(nn.Module):
    """ControlNet: (latents, timestep, text, control map, scale per sample[, pooled, time ids]) -> UNet residuals."""

    def __init__(self, controlnet: nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.sdxl = controlnet.config.addition_embed_type == "text_time"
        count = len(controlnet.controlnet_down_blocks)
        base = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale")
        self.input_names = base + (("text_embeds", "time_ids") if self.sdxl else ())
        self.output_names = tuple(f"down_residual_{i}" for i in range(count)) + ("mid_residual",)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                                    added_cond_kwargs=added, return_dict=False)
        scale = conditioning_scale.view(-1, 1, 1, 1)
        return tuple(d * scale for d in down) + (mid * scale,)


class ControlledUNetModule(UNetModule):
    """The UNet taking ControlNet residuals (added to its skip connections and middle block) as inputs."""

    def __init__(self, unet: nn.Module, residuals: int) -> None:
        super().__init__(unet)
        self.residuals = residuals
        self.input_names = self.input_names + tuple(f"down_residual_{i}" for i in range(residuals))
        self.input_names += ("mid_residual",)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor]:
        added_count = 2 if self.sdxl else 0
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.sdxl else None
        residuals = rest[added_count:]
        out = self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                        down_block_additional_residuals=list(residuals[:-1]),
                        mid_block_additional_residual=residuals[-1], return_dict=False)[0]
        return (out,)


def controlnet_modules(bundle: ModelBundle, controlnet: nn.Module) -> dict[str, nn.Module]:
    """The two extra components of a ControlNet request: the ControlNet and the UNet that takes its residuals."""
    cn = ControlNetModule(controlnet)
    return {"controlnet": cn, "unet_controlnet": ControlledUNetModule(bundle.unet, len(cn.output_names) - 1)}


class VaeDecoderModule(nn.Module):
    """VAE decoder: unscaled latents -> image in [-1, 1]."""

    input_names = ("latent",)
    output_names = ("image",)

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.decode(latent, return_dict=False)[0],)


class VaeEncoderModule(nn.Module):
    """VAE encoder: image in [-1, 1] -> latent distribution parameters (mean and log-variance, stacked)."""

    input_names = ("image",)
    output_names = ("moments",)

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.encode(image).latent_dist.parameters,)


class TorchComponent:
    """A component run eagerly by PyTorch (diffusers / transformers modules)."""

    backend = "torch"

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.input_names = tuple(module.input_names)
        self.output_names = tuple(module.output_names)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return tuple(self.module(*inputs))
