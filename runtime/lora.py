"""LoRA without recompiling: merge low-rank updates into the shared weight tensors, restore them exactly.

Files are read with diffusers' own LoRA loader (PEFT/diffusers and kohya `lora_unet_...` naming, alphas
included) and normalised to PEFT keys. Merging writes `W += weight * alpha/rank * B @ A` into the very
tensors that the torch modules and the compiled TVM / onnxruntime components read, so a LoRA applies to
every backend with no rebuild and no second copy of the model; only the touched tensors are backed up.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InvalidRequestError
from .weights import ModelBundle

MAX_WEIGHT = 4.0

log = logging.getLogger(__name__)


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

    def fits(self, shape: torch.Size) -> bool:
        """Whether B @ A has the weight's output rows and as many inputs per row."""
        up, down = self.up.flatten(1), self.down.flatten(1)
        return (len(shape) >= 2 and up.shape[0] == shape[0] and up.shape[1] == down.shape[0]
                and down.shape[1] * shape[0] == torch.Size(shape).numel())

    def describe(self) -> str:
        """The update's shape, outputs x inputs."""
        return f"{self.up.shape[0]}x{self.down.flatten(1).shape[1]}"


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read and matched against one model: the updates to merge, and what matched nothing."""

    deltas: dict[str, LoraDelta]
    unmatched: list[str] = field(default_factory=list)

    @property
    def tensors_matched(self) -> int:
        """Tensors of the file merged into the model: a down and an up half per update."""
        return 2 * len(self.deltas)

    def describe(self, name: str) -> dict:
        """The /v1/models listing entry."""
        return {"name": name, "tensors_matched": self.tensors_matched, "tensors_unmatched": len(self.unmatched)}


def read_lora(path: Path, is_sdxl: bool) -> tuple[dict[str, LoraDelta], list[str]]:
    """Read a LoRA file into updates keyed by '<network>.<parameter name>' (e.g. 'unet.conv_in.weight'),
    and the file's keys that make no update (neither half of a down/up pair)."""
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
        if any("_lora." in k or ".lora_linear_layer." in k for k in text):
            text = convert_state_dict_to_peft(text, original_type=StateDictType.DIFFUSERS_OLD)
        return out | text

    tensors = to_peft(state)
    alpha_of = {next(iter(to_peft({k.removesuffix(".alpha"): torch.zeros(1)}))): v for k, v in alphas.items()}
    deltas, paired = {}, set()
    for key, down in tensors.items():
        up_key = key.replace(".lora_A.", ".lora_B.")
        if ".lora_A." not in key or up_key not in tensors:
            continue
        rank = down.shape[0]
        alpha = float(alpha_of.get(key, rank))
        deltas[key.replace(".lora_A.weight", ".weight")] = LoraDelta(down, tensors[up_key], alpha / rank)
        paired.update((key, up_key))
    return deltas, [k for k in tensors if k not in paired]


def validate_loras(folder: Path | None, loras: dict[str, float]) -> dict[str, float]:
    """Canonical names and checked weights; unknown names list the available ones."""
    known = {n.lower(): n for n in available_loras(folder)}
    checked = {}
    for name, weight in loras.items():
        if name.lower() not in known:
            where = folder or "the LoRA dir (--lora-dir / SDAOT_LORA_DIR)"
            offered = ", ".join(known.values()) or f"none (no .safetensors files in {where})"
            raise InvalidRequestError(f"unknown LoRA {name!r}; available: {offered}", param="loras")
        if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
            raise InvalidRequestError(f"LoRA {name!r} weight {weight} is outside [-4, 4]", param="loras")
        checked[known[name.lower()]] = float(weight)
    return checked


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
        self._files: dict[str, LoraFile | InvalidRequestError] = {}  # a refused file is read once too

    def names(self) -> list[str]:
        """LoRA names this model can use."""
        return list(available_loras(self.folder))

    def describe(self) -> list[dict]:
        """Every LoRA file with how many of its updates match this model's weights (read once per file);
        a file that cannot be used says why."""
        rows = []
        for name in self.names():
            try:
                rows.append(self._read(name).describe(name))
            except InvalidRequestError as exc:
                rows.append({"name": name, "error": exc.message})
        return rows

    def _read(self, name: str) -> LoraFile:
        """The file's updates, every one checked against the weight it changes, before anything is merged;
        a file is read once, whether it is used or refused."""
        if name not in self._files:
            try:
                self._files[name] = self._match(name)
            except InvalidRequestError as exc:
                self._files[name] = exc
        found = self._files[name]
        if isinstance(found, InvalidRequestError):
            raise InvalidRequestError(found.message, param=found.param)
        return found

    def _match(self, name: str) -> LoraFile:
        deltas, unpaired = read_lora(available_loras(self.folder)[name], self.bundle.spec.is_sdxl)
        model = self.bundle.spec.name
        weight_of = {k: self._weight_key(k) for k in deltas}
        matched = {weight_of[k]: d for k, d in deltas.items() if weight_of[k] is not None}
        file = LoraFile(matched, unpaired + [k.replace(".weight", f".lora_{half}.weight") for k in deltas
                                             if weight_of[k] is None for half in "AB"])
        log.debug("LoRA %s on %s: %d tensors match, %d match nothing%s", name, model, file.tensors_matched,
                  len(file.unmatched), f" (first: {file.unmatched[0]})" if file.unmatched else "")
        if not matched:
            raise InvalidRequestError(f"LoRA {name!r} matches no weight of {model} (another architecture?)",
                                      param="loras")
        if len(file.unmatched) > file.tensors_matched:
            raise InvalidRequestError(
                f"LoRA {name!r}: {len(file.unmatched)} of its tensors match no weight of {model} and only "
                f"{file.tensors_matched} do (first unmatched: {file.unmatched[0]}); is it for another "
                f"architecture?", param="loras")
        for key, delta in matched.items():
            shape = self._params[key].shape
            if not delta.fits(shape):
                raise InvalidRequestError(
                    f"LoRA {name!r}: the update of {key} is {delta.describe()} but {model}'s weight is "
                    f"{'x'.join(map(str, shape))} (a LoRA for another architecture?)", param="loras")
        return file

    def _weight_key(self, key: str) -> str | None:
        """The model parameter an update key names, or None. LoRA files name text-encoder weights as
        transformers 4 did (`text_encoder.text_model.encoder...`); transformers 5's CLIPTextModel has no
        `text_model` level."""
        for candidate in (key, key.replace(".text_model.", ".", 1)):
            if candidate in self._params and self._params[candidate].ndim >= 2:
                return candidate
        return None

    def apply(self, loras: dict[str, float]) -> None:
        """Make the weights equal base + Σ weight·ΔW of `loras` (already validated); a no-op if unchanged.

        All or nothing: every file is read and every update's shape checked before the first write, and a
        merge that fails anyway leaves the base weights restored."""
        if loras == self._current:
            return
        wanted = {name: self._read(name).deltas for name in loras}
        self.restore()
        try:
            with torch.no_grad():
                for name, deltas in wanted.items():
                    for key, delta in deltas.items():
                        param = self._params[key]
                        if key not in self._backup:
                            self._backup[key] = param.detach().clone()
                        param.add_(delta.delta(param.shape).to(param.device, param.dtype), alpha=loras[name])
        except BaseException:
            self.restore()
            raise
        self._current = dict(loras)

    def restore(self) -> None:
        """Put back the exact base weights (bit for bit) and free the backups."""
        with torch.no_grad():
            for key, original in self._backup.items():
                self._params[key].copy_(original)
        self._backup.clear()
        self._current = {}
