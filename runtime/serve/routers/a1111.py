"""AUTOMATIC1111's web UI API under /sdapi/v1, the part its clients use: txt2img and img2img onto the same
planner and queue as the reference call, the model, sampler and LoRA listings, options, progress and
interrupt. A1111 keeps one global model choice and one running generation; here both are per API key owner
(`A1111State`), so one key's switch or interrupt never touches another's work. An interrupted generation
answers 200 with no images (A1111 answers 200 on interrupt too; its partial images do not exist here) and
`"interrupted": true` in `info`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ... import __version__
from ...errors import InvalidRequestError, SdaotError
from ...lora import available_loras, lora_dir
from ...pipeline import Plan
from ...samplers import A1111_SAMPLERS, A1111_SCHEDULERS, get_a1111_sampler
from ..a1111_protocol import (
    DEFAULT_PREVIEW_EVERY,
    A1111ErrorBody,
    A1111Response,
    Img2ImgRequest,
    OptionsUpdate,
    ProgressResponse,
    ProgressState,
    Txt2ImgRequest,
)
from ..generation_queue import Job
from ..protocol import ApiGenerationRequest, GenerationResponse, error_responses
from ..serving import Server, ServerDep, plan_request, served_pipeline, wait_sync

router = APIRouter(prefix="/sdapi/v1", responses=error_responses(401, model=A1111ErrorBody))
GENERATION_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 499, 503, 504, model=A1111ErrorBody)
FIELD_NAMES = {"model_name": "sd_model_checkpoint", "image": "init_images", "strength": "denoising_strength",
               "num_images": "batch_size", "sampler": "sampler_name"}
"""The A1111 field that a planner error's field (the reference's name) came from."""


@dataclass
class A1111Run:
    """A generation started through this API: its job, and whether /interrupt stopped it."""

    job: Job
    interrupted: bool = False


@dataclass
class A1111State:
    """Per API key owner: the options set with POST /options (the model, the preview period) and the A1111
    generation running now (what /progress reports and /interrupt stops; the latest, if several run)."""

    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    running: dict[str, A1111Run] = field(default_factory=dict)

    def options_of(self, owner: str, server: Server) -> dict[str, Any]:
        """The owner's options: A1111's defaults, the first served model, and what the owner set."""
        return {"sd_model_checkpoint": server.default_model, "show_progress_every_n_steps": DEFAULT_PREVIEW_EVERY,
                **self.options.get(owner, {})}


def get_state(request: Request) -> A1111State:
    """FastAPI dependency: the app's A1111State."""
    return request.app.state.a1111


StateDep = Annotated[A1111State, Depends(get_state)]


@router.post("/txt2img", response_model=A1111Response, responses=GENERATION_ERRORS)
async def txt2img(body: Txt2ImgRequest, request: Request, server: ServerDep,
                  state: StateDep) -> A1111Response | JSONResponse:
    """Generate batch_size * n_iter images from a prompt."""
    return await _generate(body, request, server, state)


@router.post("/img2img", response_model=A1111Response, responses=GENERATION_ERRORS)
async def img2img(body: Img2ImgRequest, request: Request, server: ServerDep,
                  state: StateDep) -> A1111Response | JSONResponse:
    """Generate from the first init image, changed by denoising_strength."""
    if body.mask is not None:
        raise InvalidRequestError("inpainting (mask) is not served; send init_images without a mask", param="mask")
    return await _generate(body, request, server, state, image=body.init_images[0],
                           strength=body.denoising_strength)


async def _generate(body: Txt2ImgRequest, request: Request, server: Server, state: A1111State,
                    image: str | None = None, strength: float | None = None) -> A1111Response | JSONResponse:
    """Plan the request as the reference's, run it on the queue while /progress can see it, and answer as
    A1111 does."""
    owner = server.owner(request)
    options = state.options_of(owner, server)
    override = body.override_settings and body.override_settings.sd_model_checkpoint
    pipe = served_pipeline(server, override or options["sd_model_checkpoint"],
                           "override_settings.sd_model_checkpoint" if override else "sd_model_checkpoint")
    sampler_name, karras, sampler = get_a1111_sampler(body.sampler_name or body.sampler_index, body.scheduler)
    fields: dict[str, Any] = {"image": image, "strength": strength} if image is not None else {}
    reference = ApiGenerationRequest(
        model_name=pipe.spec.name, prompt=body.prompt, negative_prompt=body.negative_prompt or None,
        sampler=sampler.name, steps=body.steps, cfg_scale=body.cfg_scale, width=body.width, height=body.height,
        seed=None if body.seed == -1 else body.seed, num_images=body.images,
        preview_every=max(options["show_progress_every_n_steps"], 0), **fields)
    try:
        pipe, plan = await plan_request(server, reference)
    except SdaotError as exc:
        exc.param = FIELD_NAMES.get(exc.param or "", exc.param)
        raise
    job = server.queue.run_now(pipe, plan, owner, server.delivery("png"))
    run = A1111Run(job) if job is not None else None
    if run is not None:
        state.running[owner] = run
    try:
        failed = await wait_sync(server, request, job)
    finally:
        if run is not None and state.running.get(owner) is run:
            del state.running[owner]
    if failed is not None and not (run and run.interrupted):
        return failed
    images = []
    if failed is None and body.send_images:
        assert job is not None and isinstance(job.answer, GenerationResponse)
        images = [generated.image for generated in job.answer.images]
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"] = None
    return A1111Response(images=images, parameters=parameters, info=_info(
        body, plan, pipe.spec.name, sampler_name, karras, strength, interrupted=failed is not None))


def _info(body: Txt2ImgRequest, plan: Plan, model: str, sampler_name: str, karras: bool, strength: float | None,
          interrupted: bool) -> str:
    """A1111's `info`: a JSON string of what was generated, one infotext (its PNG "parameters" text) per image."""
    schedule = "Karras" if karras else "Uniform"
    negative = f"\nNegative prompt: {body.negative_prompt}" if body.negative_prompt else ""
    infotexts = [f"{body.prompt}{negative}\nSteps: {plan.steps}, Sampler: {sampler_name}, Schedule type: {schedule}, "
                 f"CFG scale: {plan.cfg_scale:g}, Seed: {seed}, Size: {plan.width}x{plan.height}, Model: {model}"
                 + (f", Denoising strength: {strength:g}" if strength is not None else "") for seed in plan.seeds]
    return json.dumps({
        "prompt": body.prompt, "all_prompts": [body.prompt] * len(plan.seeds), "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * len(plan.seeds), "seed": plan.seeds[0],
        "all_seeds": plan.seeds, "width": plan.width, "height": plan.height, "sampler_name": sampler_name,
        "scheduler": schedule, "cfg_scale": plan.cfg_scale, "steps": plan.steps, "batch_size": body.batch_size,
        "n_iter": body.n_iter, "denoising_strength": strength, "sd_model_name": model, "sd_model_hash": None,
        "index_of_first_image": 0, "infotexts": infotexts, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "interrupted": interrupted, "version": f"sdaot {__version__}"})


@router.get("/progress", response_model=ProgressResponse, responses=error_responses(422, model=A1111ErrorBody))
async def progress(request: Request, server: ServerDep, state: StateDep,
                   skip_current_image: bool = False) -> ProgressResponse:
    """This key's current A1111 generation: fraction done, seconds left, steps, and the latest live preview
    (a WebP, every show_progress_every_n_steps steps); all zero when none runs."""
    run = state.running.get(server.owner(request))
    if run is None:
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())
    job = run.job
    preview = None if skip_current_image or job.preview is None else job.preview.image
    return ProgressResponse(
        progress=round(job.step / job.steps, 4) if job.steps else 0.0, eta_relative=job.eta() or 0.0,
        state=ProgressState(interrupted=run.interrupted, job=job.id, job_count=1, sampling_step=job.step,
                            sampling_steps=job.steps),
        current_image=preview, textinfo=f"Step {job.step}/{job.steps}")


@router.post("/interrupt")
async def interrupt(request: Request, server: ServerDep, state: StateDep) -> dict:
    """Stop this key's current A1111 generation at its next step; its call then answers with no images."""
    run = state.running.get(server.owner(request))
    if run is not None:
        run.interrupted = True
        server.queue.cancel(run.job)
    return {}


@router.get("/options")
async def get_options(request: Request, server: ServerDep, state: StateDep) -> dict:
    """The options this server reads (per API key): the model, the live preview period and format."""
    return {**state.options_of(server.owner(request), server), "sd_checkpoint_hash": None,
            "live_previews_enable": True, "live_previews_image_format": "webp", "samples_format": "png"}


@router.post("/options", responses=error_responses(400, 401, 404, 413, 422, 503, model=A1111ErrorBody))
async def set_options(options: OptionsUpdate, request: Request, server: ServerDep, state: StateDep) -> bool:
    """Set this key's `sd_model_checkpoint` (a served model) and `show_progress_every_n_steps` (0 or -1:
    no previews); other A1111 options are accepted and ignored."""
    chosen: dict[str, Any] = {}
    if options.sd_model_checkpoint is not None:
        chosen["sd_model_checkpoint"] = served_pipeline(server, options.sd_model_checkpoint,
                                                        "sd_model_checkpoint").spec.name
    if options.show_progress_every_n_steps is not None:
        chosen["show_progress_every_n_steps"] = options.show_progress_every_n_steps
    owner = server.owner(request)
    state.options[owner] = {**state.options.get(owner, {}), **chosen}
    return True


@router.get("/sd-models")
def sd_models(server: ServerDep) -> list[dict]:
    """The served models in A1111's shape; `title` is what sd_model_checkpoint takes (no file hashes)."""
    return [{"title": name, "model_name": name, "hash": None, "sha256": None,
             "filename": pipe.summary()["weights"], "config": None} for name, pipe in server.pipelines.items()]


@router.get("/samplers")
async def samplers() -> list[dict]:
    """A1111 sampler names served, with their k-diffusion alias; `options.scheduler` where A1111's
    automatic schedule is Karras."""
    return [{"name": name, "aliases": [entry.alias], "options": {"scheduler": "karras"} if entry.karras_by_default
             else {}} for name, entry in A1111_SAMPLERS.items()]


@router.get("/schedulers")
async def schedulers() -> list[dict]:
    """The `scheduler` values served (automatic: the sampler's default)."""
    return [{"name": name, "label": name.title(), "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name in A1111_SCHEDULERS]


@router.get("/loras")
def loras(server: ServerDep) -> list[dict]:
    """The LoRA files of the LoRA folder (file names, no folder path), used as <lora:name:weight> in prompts."""
    return [{"name": name, "alias": name, "path": path.name, "metadata": {}}
            for name, path in available_loras(lora_dir(server.config.lora_folder)).items()]


@router.get("/scripts")
async def scripts() -> dict:
    """No scripts or extensions: clients probe this for ControlNet, ADetailer and the like."""
    return {"txt2img": [], "img2img": []}
