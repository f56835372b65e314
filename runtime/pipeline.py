"""One generation pipeline for every backend: tokenize, encode, sample, decode.

The loop mirrors diffusers' StableDiffusion(XL)(Img2Img)Pipeline step for step, so on the torch backend it
reproduces diffusers' images; every network call goes through a Component, so compiled backends plug in
without touching the sampling math. Schedulers are diffusers' own.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .components import Component, TorchComponent, component_modules, controlnet_modules
from .controlnet import get_controlnet_name, load_controlnet, preprocess_control_image
from .errors import InvalidRequestError
from .lora import LoraMerger
from .presets import apply_preset
from .registry import ModelSpec
from .request import MAX_SEED, GenerationRequest
from .samplers import SamplerSpec, get_sampler, make_scheduler
from .selection import ComponentSelector
from .weights import ModelBundle

log = logging.getLogger(__name__)
VAE_SCALE = 8
Progress = Callable[[int, int], None]


@dataclass
class Plan:
    """A request with every default filled in and every name resolved against the model."""

    request: GenerationRequest
    height: int
    width: int
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

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance runs (a second, unconditional UNet half) only when cfg_scale > 1."""
        return self.cfg_scale > 1.0


@dataclass
class GenerationResult:
    """Images with the seed of each, the wall time and which backend ran each component."""

    images: list[Image.Image]
    seeds: list[int]
    inference_time: float
    backends: dict[str, str] = field(default_factory=dict)
    plan: Plan | None = None


class Pipeline:
    """Generates images for one model; the refiner pipeline, when given, serves `enable_refiner`."""

    def __init__(self, bundle: ModelBundle, refiner: Pipeline | None = None,
                 artifacts_root: Path | None = None, lora_folder: Path | None = None,
                 controlnet_folder: Path | None = None) -> None:
        self.bundle = bundle
        self.controlnet_folder = controlnet_folder
        self.spec: ModelSpec = bundle.spec
        self.refiner = refiner
        self.torch_components = {n: TorchComponent(n, m) for n, m in component_modules(bundle).items()}
        self.selector = ComponentSelector(self.spec.name, self.torch_components, artifacts_root)
        self.loras = LoraMerger(bundle, lora_folder)
        self.control_processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE, do_convert_rgb=True,
                                                   do_normalize=False)
        self._controlnets: dict[str, dict[str, TorchComponent]] = {}
        self.image_processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE)
        self.scaling_factor = bundle.vae.config.scaling_factor

    # ---- planning -------------------------------------------------------------------------------
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
        if req.enable_refiner and self.refiner is None:
            reason = "only applies to SDXL models" if not spec.is_sdxl else "no refiner is loaded for this model"
            raise InvalidRequestError(f"enable_refiner {reason}", param="enable_refiner")
        steps = req.steps if req.steps is not None else spec.default_steps
        if steps > spec.max_steps:
            raise InvalidRequestError(f"{spec.name} takes 1 to {spec.max_steps} steps (got {steps})", param="steps")
        height, width = self._size(req)
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
        return Plan(req, height, width, steps, req.cfg_scale if req.cfg_scale is not None else spec.default_cfg_scale,
                    sampler, seeds, prompt, negative, prompt_2, req.negative_prompt_2,
                    self.loras.validate(req.loras or {}), controlnet)

    def _size(self, req: GenerationRequest) -> tuple[int, int]:
        if req.image is not None and (req.height is None or req.width is None):
            w, h = req.image.size
            height = req.height or max(64, min(2048, h // VAE_SCALE * VAE_SCALE))
            width = req.width or max(64, min(2048, w // VAE_SCALE * VAE_SCALE))
            return height, width
        native_h, native_w = self.spec.native_resolution
        return req.height or native_h, req.width or native_w

    # ---- backends -------------------------------------------------------------------------------
    def components(self, plan: Plan) -> dict[str, Component]:
        """The component that runs each network for this plan's backend, resolution and batch."""
        n = len(plan.seeds)
        size = (plan.width, plan.height)
        needs: dict[str, tuple[tuple[int, int] | None, int]] = {name: (None, 1) for name in self.spec.text_encoders}
        unet_batch = 2 * n if plan.do_cfg else n
        extra = {}
        if plan.controlnet and self.spec.default_controlnet:
            extra = self.controlnet_components(plan.controlnet)
            needs["controlnet"] = needs["unet_controlnet"] = (size, unet_batch)
        else:
            needs["unet"] = (size, unet_batch)
        needs["vae_decoder"] = (size, n)
        if plan.request.image is not None:
            needs["vae_encoder"] = (size, 1)
        return self.selector.select(plan.request.backend, needs, extra)

    def controlnet_components(self, name: str) -> dict[str, TorchComponent]:
        """Torch components of ControlNet `name` and of the UNet taking its residuals (loaded on first use)."""
        if name not in self._controlnets:
            modules = controlnet_modules(self.bundle, load_controlnet(self.bundle, name, self.controlnet_folder))
            self._controlnets[name] = {n: TorchComponent(n, m) for n, m in modules.items()}
        return self._controlnets[name]

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, req: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
        """Run one request end to end and return its images (PIL, RGB)."""
        plan = self.plan(req)
        with self.loras.lock:
            self.loras.apply(plan.loras)
            return self._generate(plan, progress)

    def _generate(self, plan: Plan, progress: Progress | None) -> GenerationResult:
        req = plan.request
        start = time.perf_counter()
        comps = self.components(plan)
        used: dict[str, str] = {}
        denoising_end = 1.0 - req.refiner_fraction if req.enable_refiner else None
        generators = [torch.Generator().manual_seed(s) for s in plan.seeds]
        latents = self._sample(plan, comps, used, progress, generators, denoising_end=denoising_end)
        if not req.enable_refiner:
            images = self._decode(latents, comps, used)
        else:
            assert self.refiner is not None
            refiner_comps = self.refiner.components(plan)
            refiner_used: dict[str, str] = {}
            latents = self.refiner._sample(plan, refiner_comps, refiner_used, progress, generators, latents=latents,
                                           denoising_start=denoising_end)
            images = self.refiner._decode(latents, refiner_comps, refiner_used)
            used.update({f"refiner.{k}": v for k, v in refiner_used.items()})
        return GenerationResult(images, plan.seeds, time.perf_counter() - start, used, plan)

    def _call(self, comps: dict[str, Component], name: str, used: dict[str, str], *inputs: torch.Tensor):
        comp = comps[name]
        used[name] = comp.backend
        return comp(*inputs)

    def _tokenize(self, tokenizer_name: str, text: str) -> torch.Tensor:
        tok = self.bundle.tokenizers[tokenizer_name]
        return tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def _encode(self, plan: Plan, comps, used) -> dict[str, torch.Tensor]:
        """Text conditioning for the UNet, unconditional half first when CFG runs (as diffusers orders it)."""
        n = len(plan.seeds)
        if not self.spec.is_sdxl:
            embeds = self._call(comps, "text_encoder", used, self._tokenize("tokenizer", plan.prompt))[0]
            if plan.do_cfg:
                neg_ids = self._tokenize("tokenizer", plan.negative_prompt or "")
                neg = self._call(comps, "text_encoder", used, neg_ids)[0]
                return {"encoder_hidden_states": torch.cat([neg.repeat(n, 1, 1), embeds.repeat(n, 1, 1)])}
            return {"encoder_hidden_states": embeds.repeat(n, 1, 1)}

        encoders = self.spec.text_encoders
        prompts = [plan.prompt, plan.prompt_2 or plan.prompt][: len(encoders)]
        embeds, pooled = self._encode_sdxl(prompts, comps, used)
        if plan.do_cfg:
            if plan.negative_prompt is None and self.spec.force_zeros_for_empty_prompt:
                neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            else:
                negative = plan.negative_prompt or ""
                negs = [negative, plan.negative_prompt_2 or negative][: len(encoders)]
                neg, neg_pooled = self._encode_sdxl(negs, comps, used)
        time_ids, neg_time_ids = self._time_ids(plan)
        cond = {
            "encoder_hidden_states": embeds.repeat(n, 1, 1),
            "text_embeds": pooled.repeat(n, 1),
            "time_ids": time_ids.repeat(n, 1),
        }
        if plan.do_cfg:
            cond["encoder_hidden_states"] = torch.cat([neg.repeat(n, 1, 1), cond["encoder_hidden_states"]])
            cond["text_embeds"] = torch.cat([neg_pooled.repeat(n, 1), cond["text_embeds"]])
            cond["time_ids"] = torch.cat([neg_time_ids.repeat(n, 1), cond["time_ids"]])
        return cond

    def _encode_sdxl(self, prompts: list[str], comps, used) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for text, encoder in zip(prompts, self.spec.text_encoders, strict=True):
            ids = self._tokenize(encoder.replace("text_encoder", "tokenizer"), text)
            _, penultimate, pooled = self._call(comps, encoder, used, ids)
            hidden.append(penultimate)
        return torch.cat(hidden, dim=-1), pooled

    def _time_ids(self, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        size = (plan.height, plan.width)
        if self.spec.requires_aesthetics_score:
            pos, neg = list(size + (0, 0) + (6.0,)), list(size + (0, 0) + (2.5,))
        else:
            pos = neg = list(size + (0, 0) + size)
        return torch.tensor([pos], dtype=torch.float32), torch.tensor([neg], dtype=torch.float32)

    def _sample(self, plan: Plan, comps, used, progress: Progress | None, generators: list[torch.Generator],
                latents: torch.Tensor | None = None, denoising_start: float | None = None,
                denoising_end: float | None = None) -> torch.Tensor:
        """Prepare latents (noise, or an encoded image plus noise) and run the sampler loop over them.

        The generators carry on from base to refiner, as they do in diffusers' base + refiner flow.
        """
        req = plan.request
        scheduler = make_scheduler(plan.sampler, self.spec.scheduler_config, seed=plan.seeds[0])
        try:
            scheduler.set_timesteps(plan.steps)
        except ValueError as exc:
            raise InvalidRequestError(f"sampler {plan.sampler.name!r} cannot run {plan.steps} steps: {exc}",
                                      param="steps") from exc
        cond = self._encode(plan, comps, used)
        n = len(plan.seeds)
        shape = (n, self.bundle.unet.config.in_channels, plan.height // VAE_SCALE, plan.width // VAE_SCALE)
        timesteps = scheduler.timesteps
        if denoising_start is not None:
            cutoff = int(round(scheduler.config.num_train_timesteps * (1 - denoising_start)))
            count = int((scheduler.timesteps < cutoff).sum().item())
            if scheduler.order == 2 and count % 2 == 0:
                count += 1
            t_start = len(scheduler.timesteps) - count
            timesteps = scheduler.timesteps[t_start:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start)
        elif req.image is not None:
            init_count = min(int(plan.steps * req.strength), plan.steps)
            t_start = max(plan.steps - init_count, 0) * scheduler.order
            timesteps = scheduler.timesteps[t_start:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start)
            image = self.image_processor.preprocess(req.image.convert("RGB"), height=plan.height, width=plan.width)
            init = torch.cat([
                DiagonalGaussianDistribution(self._call(comps, "vae_encoder", used, image)[0]).sample(g)
                for g in generators
            ]) * self.scaling_factor
            noise = randn_tensor(shape, generator=generators, dtype=torch.float32)
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(n))
        else:
            if self.spec.is_sdxl and hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
            latents = randn_tensor(shape, generator=generators, dtype=torch.float32) * scheduler.init_noise_sigma
        if denoising_end is not None:
            cutoff = int(round(scheduler.config.num_train_timesteps * (1 - denoising_end)))
            timesteps = timesteps[: len([t for t in timesteps if t >= cutoff])]

        step_kwargs = _step_kwargs(scheduler, generators)
        control = self._control_image(plan) if plan.controlnet and self.spec.default_controlnet else None
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents] * 2) if plan.do_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            t_batch = t.to(torch.float32).expand(model_in.shape[0])
            args = [cond[k] for k in self.torch_components["unet"].input_names[2:]]
            if control is None:
                noise_pred = self._call(comps, "unet", used, model_in, t_batch, *args)[0]
            else:
                keep = 1.0 - float(i / len(timesteps) < req.control_guidance_start
                                   or (i + 1) / len(timesteps) > req.control_guidance_end)
                scale = torch.full((model_in.shape[0],), req.controlnet_conditioning_scale * keep)
                residuals = self._call(comps, "controlnet", used, model_in, t_batch, args[0], control, scale,
                                       *args[1:])
                noise_pred = self._call(comps, "unet_controlnet", used, model_in, t_batch, *args, *residuals)[0]
            if plan.do_cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + plan.cfg_scale * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if progress:
                progress(i + 1, len(timesteps))
        return latents

    def _control_image(self, plan: Plan) -> torch.Tensor:
        """The control map as diffusers' ControlNet pipelines prepare it: [0, 1], one per UNet batch row."""
        control_map = preprocess_control_image(plan.controlnet, plan.request.controlnet_image)
        image = self.control_processor.preprocess(control_map, height=plan.height, width=plan.width)
        image = image.to(torch.float32).repeat_interleave(len(plan.seeds), dim=0)
        return torch.cat([image] * 2) if plan.do_cfg else image

    def _decode(self, latents: torch.Tensor, comps, used) -> list[Image.Image]:
        image = self._call(comps, "vae_decoder", used, latents / self.scaling_factor)[0]
        return self.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    """The optional arguments diffusers passes to scheduler.step (eta=0 for DDIM, the generators for noise)."""
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generators if len(generators) > 1 else generators[0]
    return kwargs
