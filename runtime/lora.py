"""LoRA without recompiling: merge low-rank updates into the shared weight tensors, restore them exactly.

Files are read by `lora_file` (kohya, PEFT/diffusers and older diffusers layouts, each update at its own
alpha/rank). Merging writes `W += weight * alpha/rank * up @ down` into the very
tensors that the torch modules and the compiled TVM / onnxruntime components read, so a LoRA applies to
every backend with no rebuild and no second copy of the model; only the touched tensors are backed up.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .errors import InvalidRequestError
from .lora_file import LoraDelta, read_lora
from .weights import ModelBundle

MAX_WEIGHT = 4.0
FILES_KEPT = 4  # LoRA files whose tensors stay in memory between requests
LISTINGS_KEPT = 256  # /v1/models rows kept (header reads)

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
class LoraFile:
    """A LoRA file read and matched against one model: the updates to merge, and what matched nothing."""

    deltas: dict[str, LoraDelta]
    unmatched: list[str] = field(default_factory=list)

    @property
    def tensors_matched(self) -> int:
        """Tensors of the file merged into the model: a down and an up half per update."""
        return 2 * len(self.deltas)

    def describe(self, name: str) -> dict:
        """The /v1/models listing entry: what matches, and how many updates had an alpha or ran at rank."""
        with_alpha = sum(d.alpha is not None for d in self.deltas.values())
        return {"name": name, "tensors_matched": self.tensors_matched, "tensors_unmatched": len(self.unmatched),
                "updates_with_alpha": with_alpha, "updates_at_rank": len(self.deltas) - with_alpha}


def validate_loras(folder: Path | None, loras: dict[str, float], param: str = "loras") -> dict[str, float]:
    """Canonical names and checked weights; unknown names list the available ones. Errors name `param`, the
    field the names came from (`loras`, or a prompt with <lora:...> tags)."""
    known = {n.lower(): n for n in available_loras(folder)}
    checked = {}
    for name, weight in loras.items():
        if name.lower() not in known:
            where = folder or "the LoRA dir (--lora-dir / SDAOT_LORA_DIR)"
            offered = ", ".join(known.values()) or f"none (no .safetensors files in {where})"
            raise InvalidRequestError(f"unknown LoRA {name!r}; available: {offered}", param=param)
        if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
            raise InvalidRequestError(f"LoRA {name!r} weight {weight} is outside [-4, 4]", param=param)
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
        self._read_file = lru_cache(maxsize=FILES_KEPT)(self._match)
        self._listing = lru_cache(maxsize=LISTINGS_KEPT)(self._describe_file)

    def names(self) -> list[str]:
        """LoRA names this model can use."""
        return list(available_loras(self.folder))

    def describe(self) -> list[dict]:
        """Every LoRA file with how many of its updates match this model's weights and how many had an alpha;
        a file that cannot be used says why. Read from the files' headers, so a large folder costs little."""
        return [self._listing(name, *self._version(name)) for name in self.names()]

    def _version(self, name: str) -> tuple[int, int]:
        """The file's modification time and size: a rewritten file is read anew."""
        stat = available_loras(self.folder)[name].stat()
        return stat.st_mtime_ns, stat.st_size

    def _describe_file(self, name: str, *version: int) -> dict:
        try:
            return self._match(name, *version, header_only=True).describe(name)
        except InvalidRequestError as exc:
            return {"name": name, "error": exc.message}

    def _read(self, name: str) -> LoraFile:
        """The file's updates, every one checked against the weight it changes, before anything is merged;
        the last few files used stay in memory."""
        return self._read_file(name, *self._version(name))

    def _match(self, name: str, *version: int, header_only: bool = False) -> LoraFile:
        """Read and check one file against this model (`version` only keys the caches)."""
        deltas, unpaired = read_lora(available_loras(self.folder)[name], self.bundle.spec.is_sdxl, header_only)
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
