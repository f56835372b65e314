"""Sampler names of the reference API mapped onto diffusers' schedulers and their options.

Every sampler is a diffusers scheduler built from the model's own scheduler config plus the options
the name implies (Karras sigmas, SDE variant, ancestral, solver order); no sampling math lives here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import diffusers
from diffusers import SchedulerMixin

from .errors import InvalidRequestError


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler name: the diffusers scheduler class and the config options it sets."""

    name: str
    scheduler: str
    options: dict[str, Any]


_KARRAS = {"use_karras_sigmas": True}
_PLAIN = {"use_karras_sigmas": False}
_TABLE: list[tuple[str, str, dict[str, Any]]] = [
    ("DDIM", "DDIMScheduler", {}),
    ("DDPM", "DDPMScheduler", {}),
    ("DEIS 2M", "DEISMultistepScheduler", {"solver_order": 2}),
    ("DPM 2M", "DPMSolverMultistepScheduler",
     {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", **_PLAIN}),
    ("DPM 2S", "DPMSolverSinglestepScheduler",
     {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min", **_PLAIN}),
    ("DPM SDE", "DPMSolverSDEScheduler", _PLAIN),
    ("DPM SDE Karras", "DPMSolverSDEScheduler", _KARRAS),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", **_PLAIN}),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", **_KARRAS}),
    ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **_PLAIN}),
    ("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", **_PLAIN}),
    ("DPM++ 2M SDE Heun Karras", "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", **_KARRAS}),
    ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **_KARRAS}),
    ("DPM++ 2S", "DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, **_PLAIN}),
    ("DPM2", "KDPM2DiscreteScheduler", _PLAIN),
    ("DPM2 Karras", "KDPM2DiscreteScheduler", _KARRAS),
    ("DPM2 a", "KDPM2AncestralDiscreteScheduler", _PLAIN),
    ("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", _KARRAS),
    ("EDM_Euler", "EDMEulerScheduler", {}),
    ("Euler", "EulerDiscreteScheduler", _PLAIN),
    ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    ("Heun", "HeunDiscreteScheduler", _PLAIN),
    ("LCM", "LCMScheduler", {}),
    ("LMS", "LMSDiscreteScheduler", _PLAIN),
    ("LMS Karras", "LMSDiscreteScheduler", _KARRAS),
    ("PNDM", "PNDMScheduler", {"skip_prk_steps": True}),
    ("UniPC 2M", "UniPCMultistepScheduler", {"solver_order": 2}),
]
SAMPLERS: dict[str, SamplerSpec] = {name: SamplerSpec(name, cls, opts) for name, cls, opts in _TABLE}
# Names other popular front ends use for the same schedulers.
ALIASES = {"DPM++ SDE": "DPM SDE", "DPM++ SDE Karras": "DPM SDE Karras", "UniPC": "UniPC 2M"}


def _fold(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name.strip().lower())


_LOOKUP = {_fold(n): s for n, s in SAMPLERS.items()} | {_fold(a): SAMPLERS[n] for a, n in ALIASES.items()}


def get_sampler(name: str) -> SamplerSpec:
    """Find a sampler by name, ignoring case and `_`/space differences; unknown names list the valid ones."""
    spec = _LOOKUP.get(_fold(name))
    if spec is None:
        raise InvalidRequestError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}", param="sampler")
    return spec


def make_scheduler(sampler: SamplerSpec, base_config: dict[str, Any], seed: int | None = None) -> SchedulerMixin:
    """A fresh scheduler for one request: the model's scheduler config with the sampler's options on top."""
    cls = getattr(diffusers, sampler.scheduler)
    options = dict(sampler.options)
    if sampler.scheduler == "DPMSolverSDEScheduler" and seed is not None:
        options["noise_sampler_seed"] = seed
    return cls.from_config(base_config, **options)
