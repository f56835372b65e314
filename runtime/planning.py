"""Planning: a request checked against one model and completed with its defaults, before any work is queued.

A plan depends only on the model's registry entry, whether its refiner is loaded and which LoRA files exist,
never on its weights, so a process that holds no weights (the Ray Serve ingress) plans exactly as the process
that runs the generation would.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .controlnet import get_controlnet_name
from .errors import InvalidRequestError
from .lora import validate_loras
from .presets import apply_preset
from .prompt_chunks import chunk_count
from .prompt_syntax import lora_tags
from .registry import ModelSpec
from .request import MAX_SEED, GenerationRequest
from .resolution import VAE_SCALE, Resolution
from .samplers import SamplerSpec, get_sampler


@dataclass
class Plan:
    """A request with every default filled in and every name resolved against the model."""

    request: GenerationRequest
    resolution: Resolution
    steps: int
    cfg_scale: float
    sampler: SamplerSpec
    seeds: list[int]
    prompt: str
    negative_prompt: str | None
    prompt_2: str | None
    negative_prompt_2: str | None
    loras: dict[str, float] = field(default_factory=dict)
    controlnet: str | None = None
    prompt_chunks: int = 1
    """77-token chunks the prompts take (A1111 syntax: past 75 tokens, or BREAK); above 1 no compiled denoiser
    fits, since they are exported for 77 tokens of text."""

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return self.resolution.height

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return self.resolution.width

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance runs (a second, unconditional UNet half) only when cfg_scale > 1."""
        return self.cfg_scale > 1.0


class Planner:
    """Plans requests for one model: `has_refiner` says whether `enable_refiner` can be served, `lora_folder`
    which LoRA names exist."""

    def __init__(self, spec: ModelSpec, has_refiner: bool, lora_folder: Path | None) -> None:
        self.spec = spec
        self.has_refiner = has_refiner
        self.lora_folder = lora_folder

    def plan(self, req: GenerationRequest) -> Plan:
        """Validate the request against this model and fill in defaults; raises InvalidRequestError."""
        spec = self.spec
        controlnet = None
        if spec.default_controlnet:
            if req.controlnet_image is None:
                raise InvalidRequestError(f"{spec.name} needs a controlnet_image", param="controlnet_image")
            if not isinstance(req.controlnet_image, Image.Image):
                raise InvalidRequestError("controlnet_image must be a decoded image", param="controlnet_image")
            controlnet = get_controlnet_name(req.controlnet_name or spec.default_controlnet)
        elif req.controlnet_name or req.controlnet_image is not None:
            raise InvalidRequestError(f"{spec.name} takes no ControlNet; use SD1.5-ControlNet or SDXL-ControlNet",
                                      param="controlnet_name")
        if req.image is not None and not isinstance(req.image, Image.Image):
            raise InvalidRequestError("image must be a decoded image", param="image")
        if req.enable_refiner and not self.has_refiner:
            reason = "only applies to SDXL models" if not spec.is_sdxl else "no refiner is loaded for this model"
            raise InvalidRequestError(f"enable_refiner {reason}", param="enable_refiner")
        steps = req.steps if req.steps is not None else spec.default_steps
        if steps > spec.max_steps:
            raise InvalidRequestError(f"{spec.name} takes 1 to {spec.max_steps} steps (got {steps})", param="steps")
        resolution = self._size(req)
        if req.image is not None and int(steps * req.strength) < 1:
            raise InvalidRequestError(
                f"strength {req.strength} with {steps} steps leaves no denoising step; raise strength or steps",
                param="strength",
            )
        sampler = get_sampler(req.sampler or spec.default_sampler)
        first = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
        seeds = [(first + i) % (MAX_SEED + 1) for i in range(req.num_images)]
        prompt, negative = apply_preset(req.style_preset, req.prompt, req.negative_prompt)
        prompt_2 = req.prompt_2
        if req.style_preset and prompt_2 is not None:
            prompt_2, _ = apply_preset(req.style_preset, prompt_2, None)
        texts = {"prompt": prompt, "negative_prompt": negative, "prompt_2": prompt_2,
                 "negative_prompt_2": req.negative_prompt_2}
        loras = validate_loras(self.lora_folder, req.loras or {})
        chunks = 1
        if req.prompt_syntax == "a1111":
            texts, loras = self._lora_tags(texts, loras)
            chunks = self._chunks(texts, req.backend)
        return Plan(req, resolution, steps, req.cfg_scale if req.cfg_scale is not None else spec.default_cfg_scale,
                    sampler, seeds, texts["prompt"], texts["negative_prompt"], texts["prompt_2"],
                    texts["negative_prompt_2"], loras, controlnet, chunks)

    def _lora_tags(self, texts: dict[str, str | None],
                   loras: dict[str, float]) -> tuple[dict[str, str | None], dict[str, float]]:
        """The prompts without their <lora:name:weight> tags, and the tagged LoRAs added to `loras` (a LoRA both
        tagged and in the field gets both weights, as a second tag would). Errors name the prompt at fault."""
        stripped: dict[str, str | None] = {}
        merged = dict(loras)
        for param, text in texts.items():
            stripped[param] = text
            if text is None:
                continue
            try:
                stripped[param], tagged = lora_tags(text)
            except ValueError as exc:
                raise InvalidRequestError(str(exc), param=param) from exc
            for name, weight in validate_loras(self.lora_folder, tagged, param=param).items():
                merged[name] = merged.get(name, 0.0) + weight
        if merged == loras:
            return stripped, loras
        return stripped, validate_loras(self.lora_folder, merged, param="prompt")

    @staticmethod
    def _chunks(texts: dict[str, str | None], backend: str) -> int:
        """The most 77-token chunks any prompt takes. Beyond one, the UNet gets 77 * chunks tokens of text, which
        only torch takes (compiled UNets are exported for 77): `auto` runs the denoiser on torch, an explicit
        compiled backend is refused here, naming the prompt, before any work is queued."""
        counts = {}
        for param, text in texts.items():
            try:
                counts[param] = chunk_count(text or "")
            except ValueError as exc:
                raise InvalidRequestError(str(exc), param=param) from exc
        longest = max(counts, key=counts.__getitem__)
        if counts[longest] > 1 and backend in ("tvm", "onnxruntime"):
            raise InvalidRequestError(
                f"{longest} takes {counts[longest]} chunks of 75 tokens (it is longer than 75 tokens or has BREAK), "
                f"and compiled {backend} UNets take 77 tokens of text: use backend auto or torch, shorten it, or "
                "send prompt_syntax plain to cut it at 77 tokens", param=longest)
        return counts[longest]

    def _size(self, req: GenerationRequest) -> Resolution:
        """The requested size; a side left out comes from the img2img source image, else the model's native size."""
        if req.image is not None and (req.height is None or req.width is None):
            w, h = req.image.size
            height = req.height or max(64, min(2048, h // VAE_SCALE * VAE_SCALE))
            width = req.width or max(64, min(2048, w // VAE_SCALE * VAE_SCALE))
            return Resolution(width, height)
        native = self.spec.native_resolution
        return Resolution(req.width or native.width, req.height or native.height)
