"""What the server offers: models (with compiled resolutions and LoRA files), samplers, style presets."""

from __future__ import annotations

from fastapi import APIRouter

from ...errors import without_paths
from ..protocol import error_responses
from ..serving import ServerDep

router = APIRouter(prefix="/v1", responses=error_responses(401))


@router.get("/models")
def models(server: ServerDep) -> dict:
    """Served models with family, weight source, compiled resolutions per backend and LoRA files (how many
    of each file's tensors match the model; no absolute path). Generations of one model run one at a time."""
    from ...controlnet import controlnet_registry

    controlnets = [{"name": n, "preprocessor": c["preprocessor"]} for n, c in controlnet_registry().items()]
    rows = []
    for name, pipe in server.pipelines.items():
        summary = pipe.summary()
        compiled = summary["compiled_resolutions"]
        rows.append({"name": name, "family": pipe.spec.family, "weights": without_paths(summary["weights"]),
                     "native_resolution": str(pipe.spec.native_resolution),
                     "default_tvm_resolutions": [str(r) for r in pipe.spec.tvm_resolutions],
                     "compiled_resolutions": {"tvm": compiled, "onnxruntime": compiled, "torch": "any"},
                     "loras": summary["loras"],
                     "lora_files": [{k: without_paths(v) if k == "error" else v for k, v in row.items()}
                                    for row in summary["lora_files"]],
                     "max_concurrent_generations": 1,
                     "default_steps": pipe.spec.default_steps,
                     "default_cfg_scale": pipe.spec.default_cfg_scale,
                     "default_sampler": pipe.spec.default_sampler,
                     "controlnets": controlnets if pipe.spec.default_controlnet else []})
    return {"object": "list", "data": rows}


@router.get("/samplers")
async def samplers() -> dict:
    """Sampler names accepted in `sampler`, with the diffusers scheduler and options each one uses."""
    from ...samplers import SAMPLERS

    return {"object": "list", "data": [{"name": s.name, "scheduler": s.scheduler, "options": s.options}
                                       for s in SAMPLERS.values()]}


@router.get("/style-presets")
async def style_presets() -> dict:
    """Style preset names accepted in `style_preset`, with their templates."""
    from ...presets import presets

    return {"object": "list", "data": [{"name": name, **template} for name, template in presets().items()]}
