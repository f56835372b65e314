"""LCM-LoRA: a file that adapts every linear and conv layer of the UNet (as the published LCM-LoRAs do), in
kohya and PEFT layouts, loads through the LoRA path; `sampler: LCM` at a few steps with cfg_scale 1 (one UNet
row, no guidance) gives diffusers' LCMScheduler + load_lora_weights + fuse_lora image. SDXL-turbo at 1 and 4
steps gives diffusers' own pipeline's image (the model folder's scheduler, no guidance)."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from sdaot.runtime.loader import load_pipeline
from sdaot.runtime.request import parse_request
from sdaot.runtime.samplers import get_sampler, make_scheduler
from sdaot.runtime.weights import tiny_folder

pytest.importorskip("peft", reason="diffusers' fuse_lora needs peft (a test dependency)")

PROMPT = "a red cube on a table"
SCALE = 0.8


def write_lcm_lora(path, unet: torch.nn.Module, layout: str) -> int:
    """A rank-4 update of every Linear and Conv2d of `unet`; returns how many updates were written. kohya's
    diffusers-style names cannot express SDXL's `add_embedding` (diffusers renames it wrongly), so it is left out
    of that layout, as kohya's trainers leave it out."""
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        if layout == "kohya" and name.startswith("add_embedding"):
            continue
        kernel = tuple(module.weight.shape[2:])
        down = torch.randn(4, module.weight.shape[1], *kernel, generator=gen) * 0.2
        up = torch.randn(module.weight.shape[0], 4, *(1,) * len(kernel), generator=gen) * 0.2
        if layout == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                        f"{stem}.alpha": torch.tensor(8.0)}
        else:
            tensors |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}
    save_file(tensors, str(path))
    return sum(k.endswith(("lora_down.weight", "lora_A.weight")) for k in tensors)


@pytest.mark.parametrize("model", ["SD1.5", pytest.param("SDXL1.0-base", marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_lcm_lora_image_equals_diffusers(tmp_path, model, layout):
    pipe = load_pipeline(model, "tiny", lora_folder=tmp_path)
    updates = write_lcm_lora(tmp_path / "lcm.safetensors", pipe.bundle.unet, layout)
    row = next(r for r in pipe.loras.describe() if r["name"] == "lcm")
    assert row["tensors_matched"] == 2 * updates and row["tensors_unmatched"] == 0, row
    got = pipe.generate(parse_request(dict(model_name=model, prompt=PROMPT, height=64, width=64, steps=4, seed=7,
                                           sampler="LCM", cfg_scale=1.0, loras={"lcm": SCALE})))
    assert not got.plan.do_cfg

    reference_class = StableDiffusionXLPipeline if pipe.spec.is_sdxl else StableDiffusionPipeline
    ref = reference_class.from_pretrained(str(tiny_folder(pipe.spec)), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = make_scheduler(get_sampler("LCM"), pipe.spec.scheduler_config)
    ref.load_lora_weights(str(tmp_path / "lcm.safetensors"))
    ref.fuse_lora(lora_scale=SCALE)
    want = ref(prompt=PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(7)).images[0]
    assert np.asarray(want).std() > 1, "reference image is flat: the comparison would prove nothing"
    diff = np.abs(np.asarray(got.images[0], dtype=np.int16) - np.asarray(want, dtype=np.int16)).max()
    assert diff <= 1, (model, layout, diff)


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_equals_diffusers_own_pipeline(pipelines, steps):
    ours = pipelines("SDXL-turbo")
    got = ours.generate(parse_request(dict(model_name="SDXL-turbo", prompt=PROMPT, height=64, width=64,
                                           steps=steps, seed=3)))
    ref = StableDiffusionXLPipeline.from_pretrained(str(tiny_folder(ours.spec)), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    want = ref(prompt=PROMPT, height=64, width=64, num_inference_steps=steps, guidance_scale=0.0,
               generator=torch.Generator().manual_seed(3)).images[0]
    assert np.asarray(want).std() > 1, "reference image is flat: the comparison would prove nothing"
    diff = np.abs(np.asarray(got.images[0], dtype=np.int16) - np.asarray(want, dtype=np.int16)).max()
    assert diff <= 1, (steps, diff, got.plan.sampler.name, type(ref.scheduler).__name__)
