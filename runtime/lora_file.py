"""Reading a LoRA file: its low-rank updates, each with the scale alpha/rank its author meant.

A merge is only right at `W + weight * alpha/rank * up @ down`, so the alpha of every update is found in the
file itself, by the update's own name, before any key is renamed: a kohya or PEFT `<module>.alpha` tensor, or
PEFT's `lora_adapter_metadata` (`lora_alpha`, `alpha_pattern`), else alpha = rank as kohya and PEFT define it.
diffusers' loader then only renames the keys to PEFT's (`unet.<module>.lora_A.weight`); its tensors are the
file's own objects, so each renamed update is traced back to its name in the file by identity. An alpha entry
that belongs to no update means the file is read wrongly or is broken: it is refused, never merged at a guess.

With `header_only`, weights are shapes without data (only the alphas are read), so a listing of many files
costs their headers, not their tensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InvalidRequestError

# How each layout names the down half of an update; the up half replaces 'down'/'A' with 'up'/'B'.
DOWN_SUFFIXES = {".lora_down.weight": ".lora_up.weight",  # kohya (lora_unet_, lora_te_, lora_te1_, lora_te2_)
                 ".lora_A.weight": ".lora_B.weight",  # PEFT / diffusers
                 ".lora.down.weight": ".lora.up.weight",  # diffusers before PEFT: convolutions
                 "_lora.down.weight": "_lora.up.weight",  # diffusers before PEFT: attention processors
                 ".lora_linear_layer.down.weight": ".lora_linear_layer.up.weight"}  # ... and text encoders
METADATA_KEY = "lora_adapter_metadata"
NETWORK_PREFIXES = ("unet", "text_encoder_2", "text_encoder")  # longest first: 'text_encoder_2' starts 'text_encoder'


@dataclass(frozen=True)
class LoraDelta:
    """One low-rank update of one weight tensor, at the scale alpha/rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None  # None: the file gives none, so alpha = rank

    @property
    def rank(self) -> int:
        """The inner width of up @ down."""
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha/rank, the factor the update's author trained it at."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The full-rank update alpha/rank * up @ down in the weight's shape (linear, 1x1 or kxk conv)."""
        return (self.up.flatten(1).float() @ self.down.flatten(1).float()).reshape(shape) * self.scale

    def fits(self, shape: torch.Size) -> bool:
        """Whether up @ down has the weight's output rows and as many inputs per row."""
        up, down = self.up.flatten(1), self.down.flatten(1)
        return (len(shape) >= 2 and up.shape[0] == shape[0] and up.shape[1] == down.shape[0]
                and down.shape[1] * shape[0] == torch.Size(shape).numel())

    def describe(self) -> str:
        """The update's shape, outputs x inputs."""
        return f"{self.up.shape[0]}x{self.down.flatten(1).shape[1]}"


@dataclass(frozen=True)
class FileUpdate:
    """One update as the file names it: its two halves and where its alpha came from."""

    down_key: str
    up_key: str
    alpha: float | None


def split_down_key(key: str) -> tuple[str, str] | None:
    """(module, up key) for the down half of an update in any layout, else None."""
    for down, up in DOWN_SUFFIXES.items():
        if key.endswith(down):
            return key.removesuffix(down), key.removesuffix(down) + up
    return None


def metadata_alpha(metadata: dict, module: str) -> float | None:
    """PEFT's alpha for a module from `lora_adapter_metadata`: its `alpha_pattern` entry, else `lora_alpha`.

    diffusers saves one PEFT config per network under its prefix (`unet.lora_alpha`); a file of one network
    may hold the bare keys."""
    network = next((p for p in NETWORK_PREFIXES if module.startswith(p + ".")), "")
    inner = module.removeprefix(network + ".") if network else module

    def field(name: str):
        return metadata.get(f"{network}.{name}" if network else name, metadata.get(name))

    for pattern, alpha in (field("alpha_pattern") or {}).items():
        if inner == pattern or inner.endswith("." + pattern) or re.fullmatch(pattern, inner):
            return float(alpha)
    found = field("lora_alpha")
    return None if found is None else float(found)


def file_updates(keys: list[str], alphas: dict[str, float], metadata: dict) -> tuple[dict[str, FileUpdate], list[str]]:
    """Every down/up pair of the file keyed by its down key, with its alpha, and the alpha keys that fit no pair."""
    updates, used = {}, set()
    for key in keys:
        split = split_down_key(key)
        if split is None or split[1] not in keys:
            continue
        module, up_key = split
        alpha_key = next((k for k in (f"{module}.alpha", f"{key.removesuffix('.weight')}.alpha", f"{key}.alpha")
                          if k in alphas), None)
        used.add(alpha_key)
        alpha = alphas[alpha_key] if alpha_key else metadata_alpha(metadata, module)
        updates[key] = FileUpdate(key, up_key, alpha)
    return updates, [k for k in alphas if k not in used]


def load_tensors(path: Path, header_only: bool) -> tuple[dict[str, torch.Tensor], dict[str, float], dict]:
    """The file's weights (shapes only when `header_only`), its alpha values, and its PEFT metadata."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            alphas = {k: float(handle.get_tensor(k).float().reshape(-1)[0]) for k in keys if k.endswith(".alpha")}
            weights = {k: (torch.empty(handle.get_slice(k).get_shape(), device="meta") if header_only
                           else handle.get_tensor(k)) for k in keys if not k.endswith(".alpha")}
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises assorted errors for files that are not safetensors
        raise InvalidRequestError(f"cannot read LoRA file {path.name}: not a readable safetensors file",
                                  param="loras", detail=f"{type(exc).__name__}: {exc}") from exc
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"LoRA file {path.name}: its {METADATA_KEY} is not JSON", param="loras") from exc
    return weights, alphas, metadata


def read_lora(path: Path, is_sdxl: bool, header_only: bool = False) -> tuple[dict[str, LoraDelta], list[str]]:
    """The file's updates keyed by '<network>.<parameter name>' (e.g. 'unet.conv_in.weight'), and its keys that
    make no update (neither half of a down/up pair)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    weights, alphas, metadata = load_tensors(path, header_only)
    updates, stray = file_updates(list(weights), alphas, metadata)
    if stray:
        raise InvalidRequestError(
            f"LoRA file {path.name}: its alpha entry {stray[0]!r} belongs to no update ({len(stray)} such "
            f"entries); refusing to merge at a guessed scale", param="loras")
    origin = {id(weights[u.down_key]): u for u in updates.values()}
    loader = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    try:
        state = loader.lora_state_dict(dict(weights))[0]
    except Exception as exc:  # diffusers raises assorted errors for files it cannot interpret
        raise InvalidRequestError(f"cannot read LoRA file {path.name}: diffusers' LoRA reader does not know its "
                                  f"layout", param="loras", detail=f"{type(exc).__name__}: {exc}") from exc
    unet = {k: v for k, v in state.items() if k.startswith("unet.")}
    text = {k: v for k, v in state.items() if not k.startswith("unet.")}
    if any("_lora." in k or ".lora_linear_layer." in k for k in text):
        text = convert_state_dict_to_peft(text, original_type=StateDictType.DIFFUSERS_OLD)
    tensors = (convert_unet_state_dict_to_peft(unet) if unet else {}) | text
    deltas, paired = {}, set()
    for key, down in tensors.items():
        up_key = key.replace(".lora_A.", ".lora_B.")
        if ".lora_A." not in key or up_key not in tensors:
            continue
        source = origin.get(id(down))
        if source is None:
            raise InvalidRequestError(f"LoRA file {path.name}: cannot trace update {key} to its name in the file, "
                                      f"so its alpha is unknown", param="loras")
        deltas[key.replace(".lora_A.weight", ".weight")] = LoraDelta(down, tensors[up_key], source.alpha)
        paired.update((key, up_key))
    return deltas, [k for k in tensors if k not in paired]
