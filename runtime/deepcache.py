"""DeepCache (Ma et al., 2023) for diffusers' UNet2DConditionModel: the full UNet every N-th step, a shallow one
in between that reuses the deep features of the last full step.

Adjacent denoising steps change the UNet's deep, low-resolution features little, so a step may take them from the
last full step and recompute only a shallow path: the input convolution, the first down layers, the up layers
fed by their skip connections and the output convolution. Which skip connection the shallow path stops at is the
branch, numbered as the `DeepCache` package's `DeepCacheSDHelper` numbers its `cache_branch_id`: branch B is
layer B % 3 of down block B // 3, so three branches per down block. `DeepCacheSDHelper` wraps every layer of a
live UNet and returns cached outputs; here the two halves are plain modules (`CachedUNetModule` for the full step,
`ShallowUNetModule` for the others) so that they trace, export and compile like the UNet, and compute the same
numbers as the helper: the shallow path reads only skip features it computes itself, and the one cached tensor it
needs, the input of its first up layer, is what the full step returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .components import UNetModule
from .errors import InvalidRequestError

BRANCHES_PER_BLOCK = 3
"""`DeepCacheSDHelper` numbers branches in threes per down block, whatever the block's layer count."""
DEFAULT_BRANCH = 0
"""The branch `sdaot compile` builds the caching components for (the shallowest: the helper's default too)."""
FEATURE = "deep_feature"


def branch_count(unet: nn.Module) -> int:
    """How many branches the UNet has: three per down block."""
    return BRANCHES_PER_BLOCK * len(unet.down_blocks)


def check_branch(unet: nn.Module, branch: int, model: str) -> None:
    """Refuse a branch past the UNet's last down block, naming the request field."""
    if not 0 <= branch < branch_count(unet):
        raise InvalidRequestError(f"{model} has DeepCache branches 0 to {branch_count(unet) - 1} (got {branch})",
                                  param="deepcache_branch")


def is_full_step(index: int, interval: int) -> bool:
    """Whether step `index` (counted from the first step this loop runs) runs the full UNet.

    `DeepCacheSDHelper` counts the position of the timestep in the scheduler's list from the first one it sees;
    that is this index wherever timesteps are distinct. A second-order scheduler (Heun) lists each timestep twice;
    here its two evaluations count as two steps, where the helper would give both the first one's position.
    """
    return index % interval == 0


@dataclass(frozen=True)
class Branch:
    """Where the shallow path turns around: down block `block`, layer `layer` (as `DeepCacheSDHelper` numbers)."""

    block: int
    layer: int

    @classmethod
    def of(cls, branch: int) -> Branch:
        """The helper's split of a `cache_branch_id`."""
        return cls(branch // BRANCHES_PER_BLOCK, branch % BRANCHES_PER_BLOCK)

    def up_index(self, unet: nn.Module) -> int:
        """The up block mirroring the branch's down block."""
        return len(unet.up_blocks) - 1 - self.block

    def entry_layer(self, unet: nn.Module) -> int:
        """The first layer of that up block the shallow path runs: the helper runs those whose mirrored index
        (counted from the block's last layer) is at most the branch's layer."""
        return max(len(unet.up_blocks[self.up_index(unet)].resnets) - 1 - self.layer, 0)

    def feature_source(self, unet: nn.Module) -> nn.Module:
        """The module whose output enters the shallow path's first up layer: the up layer before it, else the up
        block before it, else the middle block."""
        up = self.up_index(unet)
        entry = self.entry_layer(unet)
        if entry > 0:
            block = unet.up_blocks[up]
            return (getattr(block, "attentions", None) or block.resnets)[entry - 1]
        return unet.up_blocks[up - 1] if up > 0 else unet.mid_block


class CachedUNetModule(UNetModule):
    """The full UNet that also returns the deep feature a shallow step of `branch` reuses."""

    output_names = ("noise_pred", FEATURE)

    def __init__(self, unet: nn.Module, branch: int) -> None:
        super().__init__(unet)
        self.source = Branch.of(branch).feature_source(unet)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        hook = self.source.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output[0] if isinstance(output, tuple) else output))
        try:
            (noise_pred,) = super().forward(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        finally:
            hook.remove()
        return noise_pred, captured[0]


class ShallowUNetModule(nn.Module):
    """The shallow UNet of `branch`: the denoiser's inputs plus the cached deep feature -> noise prediction.

    It repeats diffusers' UNet2DConditionModel.forward for the layers it keeps (embeddings, input convolution,
    down layers up to the branch, up layers from it, output convolution), without the ControlNet, adapter and
    FreeU hooks that sdaot never sets on a denoiser.
    """

    output_names = ("noise_pred",)

    def __init__(self, unet: nn.Module, branch: int) -> None:
        super().__init__()
        self.unet = unet
        self.branch = Branch.of(branch)
        self.sdxl = unet.config.addition_embed_type == "text_time"
        base = ("sample", "timestep", "encoder_hidden_states")
        self.input_names = base + (("text_embeds", "time_ids") if self.sdxl else ()) + (FEATURE,)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor]:
        unet = self.unet
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.sdxl else None
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        text = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        skips = self._down(unet.conv_in(sample), emb, text)
        odd_size = any(dim % 2**unet.num_upsamplers for dim in sample.shape[-2:])
        hidden = rest[-1]
        first = self.branch.up_index(unet)
        for index in range(first, len(unet.up_blocks)):
            block = unet.up_blocks[index]
            start = self.branch.entry_layer(unet) if index == first else 0
            used = len(block.resnets) - start
            block_skips, skips = skips[-used:], skips[:-used]
            size = skips[-1].shape[2:] if odd_size and index < len(unet.up_blocks) - 1 else None
            hidden = _up_layers(block, start, hidden, block_skips, emb, text, size)
        if unet.conv_norm_out:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return (unet.conv_out(hidden),)

    def _down(self, hidden: torch.Tensor, emb: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
        """The skip features of the down path up to the branch: every layer of the blocks before it, then the
        branch's block up to (not including) its layer."""
        skips = [hidden]
        for index, block in enumerate(self.unet.down_blocks[: self.branch.block + 1]):
            last = index == self.branch.block
            attentions = getattr(block, "attentions", None)
            for layer in range(min(self.branch.layer, len(block.resnets)) if last else len(block.resnets)):
                hidden = block.resnets[layer](hidden, emb)
                if attentions:
                    hidden = attentions[layer](hidden, encoder_hidden_states=text, return_dict=False)[0]
                skips.append(hidden)
            if not last and block.downsamplers is not None:
                for downsampler in block.downsamplers:
                    hidden = downsampler(hidden)
                skips.append(hidden)
        return skips


def _up_layers(block: nn.Module, start: int, hidden: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
               text: torch.Tensor, upsample_size: torch.Size | None) -> torch.Tensor:
    """An up block from layer `start` on, as diffusers' (CrossAttn)UpBlock2D runs each layer, then its upsampler."""
    attentions = getattr(block, "attentions", None)
    for layer in range(start, len(block.resnets)):
        hidden = block.resnets[layer](torch.cat([hidden, skips.pop()], dim=1), emb)
        if attentions:
            hidden = attentions[layer](hidden, encoder_hidden_states=text, return_dict=False)[0]
    for upsampler in block.upsamplers or []:
        hidden = upsampler(hidden, upsample_size)
    return hidden


def deepcache_modules(unet: nn.Module, branch: int) -> dict[str, nn.Module]:
    """The two components of a DeepCache request for `branch`: the full UNet returning the deep feature and the
    shallow UNet taking it."""
    return {"unet_cached": CachedUNetModule(unet, branch), "unet_shallow": ShallowUNetModule(unet, branch)}
