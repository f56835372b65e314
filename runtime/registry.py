"""The model registry: the API's model names and what each one is, read from data/models.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from .errors import NotFoundError
from .resolution import Resolution


@dataclass(frozen=True)
class ModelSpec:
    """One servable model name: family, networks, defaults and where its real weights live."""

    name: str
    family: str
    description: str
    hub_id: str
    networks: dict[str, str]
    native_resolution: Resolution
    scheduler_config: dict[str, Any]
    default_steps: int
    default_cfg_scale: float
    default_sampler: str
    max_steps: int
    tvm_resolutions: tuple[Resolution, ...]
    tokenizer_pads: dict[str, str] = field(default_factory=dict)
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    refiner: str | None = None
    refiner_only: bool = False
    default_controlnet: str | None = None

    @property
    def is_sdxl(self) -> bool:
        """Whether the model takes two text encoders, pooled embeddings and time ids (SDXL family)."""
        return self.family == "sdxl"

    @property
    def text_encoders(self) -> list[str]:
        """Names of the text encoder networks this model uses, in prompt order."""
        from .tokenizer import TEXT_ENCODERS

        return [n for n in TEXT_ENCODERS if n in self.networks]


def read_data(name: str) -> Any:
    """Load a JSON file shipped in sdaot.runtime.data."""
    return json.loads(resources.files("sdaot.runtime.data").joinpath(name).read_text())


@cache
def architectures() -> dict[str, dict[str, Any]]:
    """Full-size and tiny network configs keyed by architecture name."""
    return {k: v for k, v in read_data("architectures.json").items() if not k.startswith("_")}


@cache
def _models() -> dict[str, ModelSpec]:
    data = read_data("models.json")
    specs = {}
    for name, m in data["models"].items():
        pads = {"tokenizer": m.get("tokenizer_pad"), "tokenizer_2": m.get("tokenizer_2_pad")}
        specs[name] = ModelSpec(
            name=name,
            family=m["family"],
            description=m["description"],
            hub_id=m["hub_id"],
            networks=m["networks"],
            native_resolution=Resolution.parse(m["native_resolution"]),
            scheduler_config=data["schedulers"][m["scheduler"]],
            default_steps=m["defaults"]["steps"],
            default_cfg_scale=m["defaults"]["cfg_scale"],
            default_sampler=m["defaults"]["sampler"],
            max_steps=m["max_steps"],
            tvm_resolutions=tuple(Resolution.parse(r) for r in m["tvm_resolutions"]),
            tokenizer_pads={k: v for k, v in pads.items() if v},
            force_zeros_for_empty_prompt=m.get("force_zeros_for_empty_prompt", False),
            requires_aesthetics_score=m.get("requires_aesthetics_score", False),
            refiner=m.get("refiner"),
            refiner_only=m.get("refiner_only", False),
            default_controlnet=m.get("controlnet"),
        )
    return specs


def all_models(include_refiners: bool = True) -> list[ModelSpec]:
    """Every registered model, API names first."""
    return [m for m in _models().values() if include_refiners or not m.refiner_only]


def get_model(name: str, param: str = "model_name") -> ModelSpec:
    """Look a model up by its API name; unknown names list the valid ones."""
    models = _models()
    if name in models:
        return models[name]
    folded = {k.lower(): v for k, v in models.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    valid = ", ".join(m.name for m in all_models(include_refiners=False))
    raise NotFoundError(f"unknown model {name!r}; valid models: {valid}", param=param)
