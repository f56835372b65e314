"""LoRA without recompiling: merge low-rank updates into the shared weight tensors, restore them exactly.

Files are read with diffusers' own LoRA loader (PEFT/diffusers and kohya `lora_unet_...` naming, alphas
included) and normalised to PEFT keys. Merging writes `W += weight * alpha/rank * B @ A` into the very
tensors that the torch modules and the compiled TVM / onnxruntime components read, so a LoRA applies to
every backend with no rebuild and no second copy of the model; only the touched tensors are backed up.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InvalidRequestError
from .weights import ModelBundle

MAX_WEIGHT = 4.0


def lora_dir(explicit: Path | None = None) -> Path | None:
    """The LoRA folder: --lora-dir, else SDAOT_LORA_DIR, else none."""
    if explicit is not None:
        return explicit
    env = os.environ.get("SDAOT_LORA_DIR")
    return Path(env) if env else None


def available_loras(folder: Path | None) -> dict[str, Path]:
    """LoRA names (file stems) found in the folder."""
    if folder is None or not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.safetensors"))}


@dataclass(frozen=True)
class LoraDelta:
    """One low-rank update of one weight tensor."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The full-rank update B @ A * alpha/rank in the weight's shape (linear or conv)."""
        return (self.up.flatten(1).float() @ self.down.flatten(1).float()).reshape(shape) * self.scale


def read_lora(path: Path, is_sdxl: bool) -> dict[str, LoraDelta]:
    """Read a LoRA file into updates keyed by '<network>.<parameter name>' (e.g. 'unet.conv_in.weight')."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    loader = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    try:
        state, alphas = loader.lora_state_dict(str(path))[:2]
    except Exception as exc:  # diffusers raises assorted errors for files it cannot interpret
        raise InvalidRequestError(f"cannot read LoRA file {path.name}: {exc}", param="loras") from exc
    alphas = alphas or {}

    def to_peft(keys: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        unet = {k: v for k, v in keys.items() if k.startswith("unet.")}
        text = {k: v for k, v in keys.items() if not k.startswith("unet.")}
        out = convert_unet_state_dict_to_peft(unet) if unet else {}
        if any("_lora." in k for k in text):
            text = convert_state_dict_to_peft(text, original_type=StateDictType.DIFFUSERS_OLD)
        return out | text

    tensors = to_peft(state)
    alpha_of = {next(iter(to_peft({k.removesuffix(".alpha"): torch.zeros(1)}))): v for k, v in alphas.items()}
    deltas = {}
    for key, down in tensors.items():
        if ".lora_A." not in key:
            continue
        up = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if up is None:
            continue
        rank = down.shape[0]
        alpha = float(alpha_of.get(key, rank))
        deltas[key.replace(".lora_A.weight", ".weight")] = LoraDelta(down, up, alpha / rank)
    return deltas


class LoraMerger:
    """Keeps a model's weights at 'base + the requested LoRA set', switching sets between requests."""

    def __init__(self, bundle: ModelBundle, folder: Path | None = None) -> None:
        self.bundle = bundle
        self.folder = folder
        self.lock = threading.Lock()
        self._params = {f"{net}.{name}": p for net, module in bundle.networks().items()
                        for name, p in module.named_parameters()}
        self._backup: dict[str, torch.Tensor] = {}
        self._current: dict[str, float] = {}
        self._files: dict[str, dict[str, LoraDelta]] = {}

    def names(self) -> list[str]:
        """LoRA names this model can use."""
        return list(available_loras(self.folder))

    def validate(self, loras: dict[str, float]) -> dict[str, float]:
        """Canonical names and checked weights; unknown names list the available ones."""
        known = {n.lower(): n for n in available_loras(self.folder)}
        checked = {}
        for name, weight in loras.items():
            if name.lower() not in known:
                where = self.folder or "the LoRA dir (--lora-dir / SDAOT_LORA_DIR)"
                offered = ", ".join(known.values()) or f"none (no .safetensors files in {where})"
                raise InvalidRequestError(f"unknown LoRA {name!r}; available: {offered}", param="loras")
            if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
                raise InvalidRequestError(f"LoRA {name!r} weight {weight} is outside [-4, 4]", param="loras")
            checked[known[name.lower()]] = float(weight)
        return checked

    def _deltas(self, name: str) -> dict[str, LoraDelta]:
        if name not in self._files:
            deltas = read_lora(available_loras(self.folder)[name], self.bundle.spec.is_sdxl)
            matched = {k: d for k, d in deltas.items() if k in self._params and self._params[k].ndim >= 2}
            if not matched:
                raise InvalidRequestError(
                    f"LoRA {name!r} matches no weight of {self.bundle.spec.name} (another architecture?)",
                    param="loras")
            self._files[name] = matched
        return self._files[name]

    def apply(self, loras: dict[str, float]) -> None:
        """Make the weights equal base + Σ weight·ΔW of `loras` (already validated); a no-op if unchanged."""
        if loras == self._current:
            return
        wanted = {name: self._deltas(name) for name in loras}
        self.restore()
        with torch.no_grad():
            for name, deltas in wanted.items():
                for key, delta in deltas.items():
                    param = self._params[key]
                    if key not in self._backup:
                        self._backup[key] = param.detach().clone()
                    param.add_(delta.delta(param.shape).to(param.dtype), alpha=loras[name])
        self._current = dict(loras)

    def restore(self) -> None:
        """Put back the exact base weights (bit for bit) and free the backups."""
        with torch.no_grad():
            for key, original in self._backup.items():
                self._params[key].copy_(original)
        self._backup.clear()
        self._current = {}
