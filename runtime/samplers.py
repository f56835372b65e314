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


@dataclass(frozen=True)
class A1111Sampler:
    """An AUTOMATIC1111 sampler name (1.9+, where the sigma schedule is the separate `scheduler`): the sampler
    it runs here on A1111's plain schedule, the one with Karras sigmas (None: no such variant), and whether
    A1111's `automatic` scheduler picks Karras for it."""

    alias: str
    plain: str
    karras: str | None = None
    karras_by_default: bool = False


# A1111's names of the schedulers diffusers offers; its others (DPM++ 2S a, DPM++ 3M SDE, DPM fast,
# DPM adaptive, Restart, DDIM CFG++) have no diffusers scheduler and are not served.
A1111_SAMPLERS: dict[str, A1111Sampler] = {
    "DPM++ 2M": A1111Sampler("k_dpmpp_2m", "DPM++ 2M", "DPM++ 2M Karras", karras_by_default=True),
    "DPM++ SDE": A1111Sampler("k_dpmpp_sde", "DPM SDE", "DPM SDE Karras", karras_by_default=True),
    "DPM++ 2M SDE": A1111Sampler("k_dpmpp_2m_sde", "DPM++ 2M SDE", "DPM++ 2M SDE Karras"),
    "DPM++ 2M SDE Heun": A1111Sampler("k_dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun Karras"),
    "Euler a": A1111Sampler("k_euler_a", "Euler a"),
    "Euler": A1111Sampler("k_euler", "Euler"),
    "LMS": A1111Sampler("k_lms", "LMS", "LMS Karras"),
    "Heun": A1111Sampler("k_heun", "Heun"),
    "DPM2": A1111Sampler("k_dpm_2", "DPM2", "DPM2 Karras", karras_by_default=True),
    "DPM2 a": A1111Sampler("k_dpm_2_a", "DPM2 a", "DPM2 a Karras", karras_by_default=True),
    "DDIM": A1111Sampler("ddim", "DDIM"),
    "PLMS": A1111Sampler("plms", "PNDM"),
    "UniPC": A1111Sampler("unipc", "UniPC 2M"),
    "LCM": A1111Sampler("k_lcm", "LCM"),
}
A1111_SCHEDULERS: dict[str, bool | None] = {"automatic": None, "uniform": False, "karras": True}
"""A1111's `scheduler` names served: Karras sigmas or not (None: the sampler's default)."""


def get_a1111_sampler(name: str, scheduler: str | None) -> tuple[str, bool, SamplerSpec]:
    """The A1111 sampler `name` (1.9+ name or alias, or an older `<name> Karras`) under `scheduler`: its 1.9+
    name, whether it runs with Karras sigmas, and the sampler that runs it. Unknown names list the valid ones,
    naming the A1111 field at fault."""
    schedule = _fold(scheduler or "automatic")
    if schedule not in A1111_SCHEDULERS:
        raise InvalidRequestError(f"unknown scheduler {scheduler!r}; valid schedulers: {', '.join(A1111_SCHEDULERS)}",
                                  param="scheduler")
    folded = _fold(name)
    karras_named = folded.endswith(" karras")
    base = folded.removesuffix(" karras")
    found = next((n for n, s in A1111_SAMPLERS.items() if base in (_fold(n), _fold(s.alias))), None)
    if found is None:
        raise InvalidRequestError(f"unknown sampler {name!r}; valid sampler_name values: "
                                  f"{', '.join(A1111_SAMPLERS)} (with scheduler Karras or a ' Karras' suffix where "
                                  "offered)", param="sampler_name")
    entry = A1111_SAMPLERS[found]
    wanted = A1111_SCHEDULERS[schedule]
    karras = karras_named or (entry.karras_by_default if wanted is None else wanted)
    if karras and entry.karras is None:
        if karras_named or wanted:
            raise InvalidRequestError(f"sampler {found!r} has no Karras variant here", param="scheduler")
        karras = False
    return found, karras, SAMPLERS[entry.karras if karras else entry.plain]
