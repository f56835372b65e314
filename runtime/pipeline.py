"""One generation pipeline for every backend: plan, encode the prompt, prepare the latents, denoise, decode.

`generate` only orders named steps, as diffusers' pipelines do: `encode_prompt`, `timesteps`,
`prepare_latents`, `denoise_loop` (its `predict_noise` holds ControlNet and CFG) and `decode`. The loop
mirrors diffusers' StableDiffusion(XL)(Img2Img)Pipeline step for step, so on the torch backend it reproduces
diffusers' images; every network call goes through a Component, so compiled backends plug in without
touching the sampling math. Schedulers are diffusers' own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .component_table import COMPONENTS, component_modules, sdxl_time_ids
from .components import Component, TorchComponent, controlnet_modules
from .controlnet import load_controlnet, preprocess_control_image
from .deepcache import DEFAULT_BRANCH, check_branch, deepcache_modules, is_full_step
from .errors import InvalidRequestError
from .lora import LoraMerger
from .planning import Plan, Planner
from .previews import PreviewSink, clean_estimate, fitted, is_due, linear_preview
from .prompt_chunks import PromptChunk, emphasized, padded, plain_chunk, prompt_chunks
from .registry import ModelSpec
from .request import GenerationRequest
from .resolution import VAE_SCALE
from .samplers import make_scheduler
from .selection import ComponentSelector
from .weights import ModelBundle

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
LOCK_POLL_S = 0.05
TEXT_TAKERS = ("unet", "controlnet", "unet_controlnet", "unet_cached", "unet_shallow")
"""The networks that read the text's hidden states, exported for 77 tokens of it when compiled."""


class Cancelled(Exception):
    """Raised inside a generation that was cancelled, timed out, or whose client went away."""


@dataclass
class Run:
    """One request in flight through one pipeline: its plan, the component chosen for each network, a random
    generator per image and which backend ran each network so far."""

    plan: Plan
    components: dict[str, Component]
    generators: list[torch.Generator]
    progress: Progress | None = None
    preview: PreviewSink | None = None
    used: dict[str, str] = field(default_factory=dict)
    deep_feature: torch.Tensor | None = None
    """Under DeepCache, the deep feature of the last full UNet step, which the shallow steps reuse."""

    def call(self, name: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run network `name` on its chosen backend, noting that backend."""
        component = self.components[name]
        self.used[name] = component.backend
        return component(*inputs)


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
        self.device = next(bundle.unet.parameters()).device
        self.torch_components = {n: TorchComponent(n, m) for n, m in component_modules(bundle).items()}
        self.selector = ComponentSelector(self.spec.name, self.torch_components, artifacts_root, self.device)
        self.loras = LoraMerger(bundle, lora_folder)
        self.planner = Planner(self.spec, refiner is not None, lora_folder)
        self.control_processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE, do_convert_rgb=True,
                                                   do_normalize=False)
        self._controlnets: dict[str, dict[str, TorchComponent]] = {}
        self._deepcache: dict[int, dict[str, TorchComponent]] = {}
        self.image_processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE)
        self.scaling_factor = bundle.vae.config.scaling_factor

    # ---- planning -------------------------------------------------------------------------------
    def plan(self, req: GenerationRequest) -> Plan:
        """Validate the request against this model and fill in defaults; raises InvalidRequestError."""
        plan = self.planner.plan(req)
        self.check_decoder(plan)
        self.check_deepcache(plan)
        return plan

    def check_decoder(self, plan: Plan) -> None:
        """Refuse `vae: tiny` where the pipeline that decodes (the refiner's, with it) has no tiny decoder: a
        plan made without the weights (a Ray ingress) is checked here, where they are."""
        decoding = self.refiner if plan.request.enable_refiner and self.refiner is not None else self
        if self.decoder(plan) not in decoding.torch_components:
            raise InvalidRequestError(
                f"{decoding.spec.name} has no tiny decoder: put diffusers AutoencoderTiny weights (TAESD, or TAESDXL "
                f"for SDXL models) in DIR/{decoding.spec.family}/ and start with --tiny-vae-dir DIR", param="vae")

    def check_deepcache(self, plan: Plan) -> None:
        """Refuse DeepCache where it cannot run as asked: beside a ControlNet (whose residuals feed the deep layers
        it skips), on a branch the UNet lacks, or on a branch other than the compiled one (`DEFAULT_BRANCH`) while
        a compiled backend is demanded (`auto` runs the other branches on torch)."""
        req = plan.request
        if not req.deepcache_interval:
            return
        if self.spec.default_controlnet:
            raise InvalidRequestError(f"{self.spec.name} runs a ControlNet, which DeepCache does not combine with",
                                      param="deepcache_interval")
        check_branch(self.bundle.unet, req.deepcache_branch, self.spec.name)
        if req.enable_refiner and self.refiner is not None:
            check_branch(self.refiner.bundle.unet, req.deepcache_branch, self.refiner.spec.name)
        if req.deepcache_branch != DEFAULT_BRANCH and req.backend in ("tvm", "onnxruntime"):
            raise InvalidRequestError(
                f"compiled shallow UNets are built for DeepCache branch {DEFAULT_BRANCH}; branch "
                f"{req.deepcache_branch} runs with backend auto or torch", param="deepcache_branch")

    def compiled_resolutions(self) -> list[str]:
        """Resolutions with a compiled UNet for this pipeline's device, as WIDTHxHEIGHT."""
        return self.selector.compiled_resolutions()

    def summary(self) -> dict:
        """What this pipeline offers, for /v1/models: weight source, compiled resolutions, LoRA names and files
        (each LoRA file is read once, on the first listing)."""
        return {"weights": self.bundle.source, "compiled_resolutions": self.compiled_resolutions(),
                "loras": self.loras.names(), "lora_files": self.loras.describe()}

    # ---- backends -------------------------------------------------------------------------------
    def components(self, plan: Plan) -> dict[str, Component]:
        """The component that runs each network for this plan's backend, resolution and batch."""
        names = list(self.spec.text_encoders)
        extra = {}
        if plan.controlnet and self.spec.default_controlnet:
            extra = self.controlnet_components(plan.controlnet)
            names += ["controlnet", "unet_controlnet"]
        elif plan.request.deepcache_interval:
            extra = self.deepcache_components(plan.request.deepcache_branch)
            names += list(extra)
        else:
            names.append("unet")
        names.append(self.decoder(plan))
        if plan.request.image is not None:
            names.append("vae_encoder")
        needs = {name: (None if COMPONENTS[name].size_free else plan.resolution,
                        COMPONENTS[name].batch.rows(len(plan.seeds), plan.do_cfg)) for name in names}
        deep = {}
        if plan.request.deepcache_interval and plan.request.deepcache_branch != DEFAULT_BRANCH:
            # Compiled shallow UNets are DEFAULT_BRANCH's: another branch runs its two UNets on torch.
            deep = self.selector.select("torch", {name: needs.pop(name) for name in extra}, extra)
        if plan.prompt_chunks == 1:
            return deep | self.selector.select(plan.request.backend, needs, extra)
        # A prompt of several chunks: only torch takes its 77 * chunks tokens (the planner refused tvm/onnxruntime).
        on_torch = {name: need for name, need in needs.items() if name in TEXT_TAKERS}
        rest = {name: need for name, need in needs.items() if name not in TEXT_TAKERS}
        return deep | self.selector.select("torch", on_torch, extra) | self.selector.select(plan.request.backend, rest)

    def controlnet_components(self, name: str) -> dict[str, TorchComponent]:
        """Torch components of ControlNet `name` and of the UNet taking its residuals (loaded on first use)."""
        if name not in self._controlnets:
            controlnet = load_controlnet(self.bundle, name, self.controlnet_folder).to(self.device)
            modules = controlnet_modules(self.bundle, controlnet)
            self._controlnets[name] = {n: TorchComponent(n, m) for n, m in modules.items()}
        return self._controlnets[name]

    def deepcache_components(self, branch: int) -> dict[str, TorchComponent]:
        """Torch components of DeepCache's full and shallow UNets for `branch` (made on first use)."""
        if branch not in self._deepcache:
            modules = deepcache_modules(self.bundle.unet, branch)
            self._deepcache[branch] = {n: TorchComponent(n, m) for n, m in modules.items()}
        return self._deepcache[branch]

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, request: GenerationRequest | Plan, progress: Progress | None = None,
                 stop: threading.Event | None = None, preview: PreviewSink | None = None) -> GenerationResult:
        """Run one request (or its already made plan) end to end and return its images (PIL, RGB).

        With the refiner, this pipeline denoises up to `1 - refiner_fraction` of the schedule and the refiner
        pipeline takes the latents and the random generators from there, as diffusers' base + refiner flow.
        `stop` set (the request was cancelled or timed out) raises Cancelled while waiting for the model (its
        weights hold one LoRA set at a time) and once it is taken, before any LoRA is merged or prompt encoded.
        `preview` receives the live previews the plan asks for (`preview_every`).
        """
        if isinstance(request, Plan):
            plan = request
            self.check_decoder(plan)
            self.check_deepcache(plan)
        else:
            plan = self.plan(request)
        with self._model_lock(stop):
            self.loras.apply(plan.loras)
            start = time.perf_counter()
            run = self.start(plan, progress, preview=preview)
            if not plan.request.enable_refiner:
                images = self.decode(run, self.denoise(run))
                return GenerationResult(images, plan.seeds, time.perf_counter() - start, run.used, plan)
            assert self.refiner is not None
            split = 1.0 - plan.request.refiner_fraction
            latents = self.denoise(run, end=split)
            refined = self.refiner.start(plan, progress, run.generators, preview)
            images = self.refiner.decode(refined, self.refiner.denoise(refined, latents, start=split))
            used = run.used | {f"refiner.{k}": v for k, v in refined.used.items()}
            return GenerationResult(images, plan.seeds, time.perf_counter() - start, used, plan)

    @contextmanager
    def _model_lock(self, stop: threading.Event | None) -> Iterator[None]:
        """Hold the model's LoRA lock, given up waiting for as soon as `stop` is set."""
        while not self.loras.lock.acquire(timeout=LOCK_POLL_S):
            if stop is not None and stop.is_set():
                raise Cancelled()
        try:
            if stop is not None and stop.is_set():
                raise Cancelled()
            yield
        finally:
            self.loras.lock.release()

    def start(self, plan: Plan, progress: Progress | None = None,
              generators: list[torch.Generator] | None = None, preview: PreviewSink | None = None) -> Run:
        """A request in flight on this pipeline: its components chosen, one random generator per image."""
        generators = generators or [torch.Generator().manual_seed(s) for s in plan.seeds]
        return Run(plan, self.components(plan), generators, progress, preview)

    def denoise(self, run: Run, latents: torch.Tensor | None = None, start: float | None = None,
                end: float | None = None) -> torch.Tensor:
        """Encode the prompt, prepare the latents and run the sampler from `start` to `end` (fractions of the
        schedule; None: all of it) over them: the denoising half of a request."""
        scheduler = self.scheduler(run.plan)
        cond = self.encode_prompt(run)
        timesteps = self.timesteps(run.plan, scheduler, start)
        latents = self.prepare_latents(run, scheduler, timesteps, latents)
        return self.denoise_loop(run, scheduler, _until(scheduler, timesteps, end), latents, cond)

    def scheduler(self, plan: Plan):
        """The plan's sampler as a diffusers scheduler, set to the plan's step count."""
        scheduler = make_scheduler(plan.sampler, self.spec.scheduler_config, seed=plan.seeds[0])
        try:
            scheduler.set_timesteps(plan.steps, device=self.device)
        except ValueError as exc:
            raise InvalidRequestError(f"sampler {plan.sampler.name!r} cannot run {plan.steps} steps: {exc}",
                                      param="steps") from exc
        return scheduler

    def encode_prompt(self, run: Run) -> dict[str, torch.Tensor]:
        """Text conditioning for the UNet, unconditional half first when CFG runs (as diffusers orders it)."""
        plan = run.plan
        n = len(plan.seeds)
        if not self.spec.is_sdxl:
            texts = [plan.prompt, *([plan.negative_prompt or ""] if plan.do_cfg else [])]
            (embeds, _), *negative = self._encode(run, [("text_encoder", text) for text in texts])
            if negative:
                neg = negative[0][0]
                return {"encoder_hidden_states": torch.cat([neg.repeat(n, 1, 1), embeds.repeat(n, 1, 1)])}
            return {"encoder_hidden_states": embeds.repeat(n, 1, 1)}

        encoders = self.spec.text_encoders
        prompts = [plan.prompt, plan.prompt_2 or plan.prompt][: len(encoders)]
        zeros = plan.negative_prompt is None and self.spec.force_zeros_for_empty_prompt
        negatives: list[str] = []
        if plan.do_cfg and not zeros:
            negative = plan.negative_prompt or ""
            negatives = [negative, plan.negative_prompt_2 or negative][: len(encoders)]
        encoded = self._encode(run, [*zip(encoders, prompts, strict=True),
                                    *zip(encoders[: len(negatives)], negatives, strict=True)])
        embeds, pooled = _joined(encoded[: len(encoders)])
        if plan.do_cfg:
            if zeros:
                neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            else:
                neg, neg_pooled = _joined(encoded[len(encoders):])
        time_ids, neg_time_ids = (torch.tensor([ids], device=self.device)
                                  for ids in sdxl_time_ids(self.spec, plan.resolution))
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

    def _encode(self, run: Run, texts: list[tuple[str, str]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(hidden states, pooled) of each (encoder, text), as A1111 reads prompts unless the request asks for
        `prompt_syntax: plain`: one fixed (1, 77) encoder call per chunk, each chunk's hidden states weighted,
        the chunks joined along the sequence axis and every text padded to the same number of chunks; the
        pooled output is the first chunk's. SD1.x/2.x read the final-norm layer, SDXL the penultimate one."""
        tokenizers = [self.bundle.tokenizers[COMPONENTS[encoder].tokenizer] for encoder, _ in texts]
        plain = run.plan.request.prompt_syntax == "plain"
        chunked = [[plain_chunk(tok, text)] if plain else prompt_chunks(tok, text)
                   for tok, (_, text) in zip(tokenizers, texts, strict=True)]
        count = max(map(len, chunked))
        layer = 1 if self.spec.is_sdxl else 0
        encoded = []
        for tok, (encoder, _), chunks in zip(tokenizers, texts, chunked, strict=True):
            outputs = [(chunk, run.call(encoder, self._ids(chunk))) for chunk in padded(tok, chunks, count)]
            hidden = [emphasized(out[layer], chunk.weights) if chunk.weighted else out[layer] for chunk, out in outputs]
            encoded.append((torch.cat(hidden, dim=1), outputs[0][1][2]))
        return encoded

    def _ids(self, chunk: PromptChunk) -> torch.Tensor:
        return torch.tensor([chunk.ids], dtype=torch.int64, device=self.device)

    def timesteps(self, plan: Plan, scheduler, start: float | None = None) -> torch.Tensor:
        """The timesteps to run: from `start` (a fraction of the schedule, for the refiner), or the last
        `strength` of them for img2img, else all; the scheduler is told where it begins."""
        if start is not None:
            cutoff = int(round(scheduler.config.num_train_timesteps * (1 - start)))
            count = int((scheduler.timesteps < cutoff).sum().item())
            if scheduler.order == 2 and count % 2 == 0:
                count += 1
            begin = len(scheduler.timesteps) - count
        elif plan.request.image is not None:
            init_count = min(int(plan.steps * plan.request.strength), plan.steps)
            begin = max(plan.steps - init_count, 0) * scheduler.order
        else:
            if not self.spec.is_sdxl:
                return scheduler.timesteps
            begin = 0
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        return scheduler.timesteps[begin:]

    def prepare_latents(self, run: Run, scheduler, timesteps: torch.Tensor,
                        latents: torch.Tensor | None = None) -> torch.Tensor:
        """The latents the loop starts from: given ones (the refiner's), the encoded source image noised to
        the first timestep (img2img), or pure noise scaled for the scheduler."""
        if latents is not None:
            return latents
        plan = run.plan
        n = len(plan.seeds)
        shape = (n, self.bundle.unet.config.in_channels, *plan.resolution.latent)
        if plan.request.image is None:
            return randn_tensor(shape, generator=run.generators, device=self.device,
                                dtype=torch.float32) * scheduler.init_noise_sigma
        image = self.image_processor.preprocess(plan.request.image.convert("RGB"), height=plan.height,
                                                width=plan.width).to(self.device)
        init = torch.cat([
            DiagonalGaussianDistribution(run.call("vae_encoder", image)[0]).sample(g) for g in run.generators
        ]) * self.scaling_factor
        noise = randn_tensor(shape, generator=run.generators, device=self.device, dtype=torch.float32)
        return scheduler.add_noise(init, noise, timesteps[:1].repeat(n))

    def denoise_loop(self, run: Run, scheduler, timesteps: torch.Tensor, latents: torch.Tensor,
                     cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """One scheduler step per timestep on the noise the UNet predicts; progress is told after each, and a
        live preview made where one is due."""
        step_kwargs = _step_kwargs(scheduler, run.generators)
        control = self._control_image(run.plan) if run.plan.controlnet and self.spec.default_controlnet else None
        for i, t in enumerate(timesteps):
            noise_pred = self.predict_noise(run, scheduler, latents, t, cond, control, (i, len(timesteps)))
            stepped = scheduler.step(noise_pred, t, latents, **step_kwargs)
            latents = stepped.prev_sample
            if run.progress:
                run.progress(i + 1, len(timesteps))
            if run.preview and is_due(run.plan.request.preview_every, i + 1, len(timesteps)):
                run.preview(i + 1, self.preview_image(run, clean_estimate(stepped, latents)))
        return latents

    def predict_noise(self, run: Run, scheduler, latents: torch.Tensor, t: torch.Tensor,
                      cond: dict[str, torch.Tensor], control: torch.Tensor | None,
                      step: tuple[int, int]) -> torch.Tensor:
        """The UNet's noise prediction at timestep t, with the ControlNet's residuals while its guidance window
        (`control_guidance_start/end`, as fractions of the `step` (index, count)) is open, and CFG applied."""
        plan, req = run.plan, run.plan.request
        model_in = torch.cat([latents] * 2) if plan.do_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        t_batch = t.to(torch.float32).expand(model_in.shape[0])
        args = [cond[k] for k in self.torch_components["unet"].input_names[2:]]
        if control is None:
            noise_pred = self.unet_noise(run, step[0], model_in, t_batch, args)
        else:
            i, count = step
            keep = 1.0 - float(i / count < req.control_guidance_start or (i + 1) / count > req.control_guidance_end)
            scale = torch.full((model_in.shape[0],), req.controlnet_conditioning_scale * keep, device=self.device)
            residuals = run.call("controlnet", model_in, t_batch, args[0], control, scale, *args[1:])
            noise_pred = run.call("unet_controlnet", model_in, t_batch, *args, *residuals)[0]
        if not plan.do_cfg:
            return noise_pred
        uncond, text = noise_pred.chunk(2)
        return uncond + plan.cfg_scale * (text - uncond)

    def unet_noise(self, run: Run, index: int, model_in: torch.Tensor, t_batch: torch.Tensor,
                   args: list[torch.Tensor]) -> torch.Tensor:
        """The UNet's noise prediction at step `index`; under DeepCache the full UNet runs every
        `deepcache_interval`-th step and keeps its deep feature in the run, the shallow UNet reuses it between."""
        interval = run.plan.request.deepcache_interval
        if not interval:
            return run.call("unet", model_in, t_batch, *args)[0]
        if is_full_step(index, interval):
            noise_pred, run.deep_feature = run.call("unet_cached", model_in, t_batch, *args)
            return noise_pred
        return run.call("unet_shallow", model_in, t_batch, *args, run.deep_feature)[0]

    def _control_image(self, plan: Plan) -> torch.Tensor:
        """The control map as diffusers' ControlNet pipelines prepare it: [0, 1], one per UNet batch row."""
        control_map = preprocess_control_image(plan.controlnet, plan.request.controlnet_image)
        image = self.control_processor.preprocess(control_map, height=plan.height, width=plan.width)
        image = image.to(self.device, torch.float32).repeat_interleave(len(plan.seeds), dim=0)
        return torch.cat([image] * 2) if plan.do_cfg else image

    def decoder(self, plan: Plan) -> str:
        """The decoder component the plan asks for: the model's VAE, or the tiny one."""
        return "vae_decoder_tiny" if plan.request.vae == "tiny" else "vae_decoder"

    def preview_image(self, run: Run, latents: torch.Tensor) -> Image.Image:
        """The first image of `latents` as a live preview: through the tiny decoder where there is one (the
        plan's own, compiled, when it decodes with it; else torch's, for one image), else the linear map."""
        plan = run.plan
        if "vae_decoder_tiny" in run.components:
            decoded = run.components["vae_decoder_tiny"](latents / self.bundle.tiny_vae.config.scaling_factor)[0][:1]
        elif "vae_decoder_tiny" in self.torch_components:
            tiny = self.torch_components["vae_decoder_tiny"]
            decoded = tiny(latents[:1] / self.bundle.tiny_vae.config.scaling_factor)[0]
        else:
            return fitted(linear_preview(latents, self.spec.family), plan.width, plan.height)
        image = self.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True])[0]
        return fitted(image, plan.width, plan.height)

    def decode(self, run: Run, latents: torch.Tensor) -> list[Image.Image]:
        """Latents -> RGB images through the plan's decoder (each scales the latents by its own factor)."""
        name = self.decoder(run.plan)
        vae = self.bundle.tiny_vae if name == "vae_decoder_tiny" else self.bundle.vae
        image = run.call(name, latents / vae.config.scaling_factor)[0]
        return self.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])


def _joined(encoded: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning from its encoders' outputs: hidden states side by side, the last encoder's pooled."""
    return torch.cat([hidden for hidden, _ in encoded], dim=-1), encoded[-1][1]


def _until(scheduler, timesteps: torch.Tensor, end: float | None) -> torch.Tensor:
    """The timesteps before `end` (a fraction of the schedule; None: all), where the refiner takes over."""
    if end is None:
        return timesteps
    cutoff = int(round(scheduler.config.num_train_timesteps * (1 - end)))
    return timesteps[: len([t for t in timesteps if t >= cutoff])]


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
