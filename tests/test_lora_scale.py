"""LoRA scale: every merged tensor is W + w·alpha/rank·up@down, computed here from the file's own tensors,
for kohya (LoCon convolutions included), PEFT with alpha keys or PEFT metadata, and SDXL's two encoders;
and, where diffusers' fuse_lora handles the file, the same tensors and image as diffusers."""

import json

import numpy as np
import pytest
import torch
from conftest import psnr
from safetensors.torch import load_file, save_file

from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.loader import load_pipeline
from sdaot.runtime.request import parse_request

WEIGHT = 0.7
RANK = 4
BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
# sdaot parameter -> its module as the file names it. A 3x3 ResNet conv in the down and the up path (LoCon),
# a 1x1 conv, attention projections and the text encoder's attention and MLP.
SD15_UNET = {f"unet.{BLOCK}.attn1.{p}.weight": f"{BLOCK}.attn1.{p}" for p in ("to_q", "to_k", "to_v")} | {
    f"unet.{m}.weight": m for m in ("down_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.0.conv1",
                                    "down_blocks.0.attentions.0.proj_in")}
SD15_TEXT = {f"text_encoder.encoder.layers.0.{m}.weight": f"text_model.encoder.layers.0.{m}"
             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1", "mlp.fc2")}
SDXL_UNET = {f"unet.{m}.weight": m for m in ("down_blocks.0.resnets.0.conv1",
                                             "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")}
SDXL_TEXT = {"text_encoder.encoder.layers.0.self_attn.q_proj.weight": ("te1", "text_encoder",
                                                                       "text_model.encoder.layers.0.self_attn.q_proj"),
             "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.weight": ("te2", "text_encoder_2",
                                                                            "text_model.encoder.layers.0.mlp.fc1")}


def halves(weight: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random rank-4 update for a linear or kxk conv weight, in the layout LoRA files store it."""
    out, inner = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    down = torch.randn(RANK, inner, *kernel, generator=gen)
    up = torch.randn(out, RANK, *(1,) * len(kernel), generator=gen) * 0.3
    return down, up


def write_file(path, pipe, names: dict[str, str], layout: str, alpha_of=lambda key: 2.0, metadata=None):
    """Write a LoRA file touching `names` (sdaot parameter -> file module name) and return, per parameter,
    (down, up, alpha) as written; alpha None when the file has none."""
    params = {f"{n}.{k}": p for n, m in pipe.bundle.networks().items() for k, p in m.named_parameters()}
    gen = torch.Generator().manual_seed(len(path.name))
    tensors, written = {}, {}
    for key, module in names.items():
        down, up = halves(params[key], gen)
        alpha = alpha_of(key)
        if layout == "kohya":
            stem = module if module.startswith("lora_") else f"lora_unet_{module.replace('.', '_')}"
            tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
            alpha_key = f"{stem}.alpha"
        else:
            tensors |= {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
            alpha_key = f"{module}.alpha"
        if alpha is not None and layout != "peft-metadata":
            tensors[alpha_key] = torch.tensor(float(alpha))
        written[key] = (down, up, alpha)
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata)} if metadata else None)
    return written


def kohya_text(names: dict[str, str], prefix: str = "lora_te") -> dict[str, str]:
    return {k: f"{prefix}_{m.replace('.', '_')}" for k, m in names.items()}


def assert_merged_by_formula(pipe, written, base):
    """Each touched tensor is base + w·alpha/rank·up@down, from the file's tensors; nothing else moved."""
    params = {f"{n}.{k}": p for n, m in pipe.bundle.networks().items() for k, p in m.named_parameters()}
    for key, (down, up, alpha) in written.items():
        scale = (RANK if alpha is None else alpha) / RANK
        want = base[key] + WEIGHT * scale * (up.flatten(1) @ down.flatten(1)).reshape(base[key].shape)
        torch.testing.assert_close(params[key].detach(), want, rtol=1e-5, atol=1e-5, msg=key)
    moved = {k for k, p in params.items() if not torch.equal(p.detach(), base[k])}
    assert moved == set(written)


def merge(pipe, folder, name):
    base = {f"{n}.{k}": p.detach().clone() for n, m in pipe.bundle.networks().items()
            for k, p in m.named_parameters()}
    pipe.loras.folder = folder
    pipe.loras.apply({name: WEIGHT})
    return base


@pytest.fixture
def sd15():
    pipe = load_pipeline("SD1.5", "tiny")
    yield pipe
    pipe.loras.restore()


@pytest.fixture
def sdxl():
    pipe = load_pipeline("SDXL1.0-base", "tiny")
    yield pipe
    pipe.loras.restore()


def test_kohya_locon_convolutions_and_text_encoder_merge_at_alpha_over_rank(sd15, tmp_path):
    no_alpha = f"unet.{BLOCK}.attn1.to_v.weight"
    names = SD15_UNET | kohya_text(SD15_TEXT)
    written = write_file(tmp_path / "locon.safetensors", sd15, names, "kohya",
                         alpha_of=lambda key: None if key == no_alpha else 2.0)
    assert_merged_by_formula(sd15, written, merge(sd15, tmp_path, "locon"))
    row = next(r for r in sd15.loras.describe() if r["name"] == "locon")
    assert row == {"name": "locon", "tensors_matched": 2 * len(names), "tensors_unmatched": 0,
                   "updates_with_alpha": len(names) - 1, "updates_at_rank": 1}


def test_peft_alpha_keys(sd15, tmp_path):
    names = {k: f"unet.{m}" for k, m in SD15_UNET.items()} | {
        k: f"text_encoder.{m}" for k, m in SD15_TEXT.items()}
    written = write_file(tmp_path / "peft.safetensors", sd15, names, "peft", alpha_of=lambda key: 8.0)
    assert_merged_by_formula(sd15, written, merge(sd15, tmp_path, "peft"))


def test_peft_metadata_alpha_and_alpha_pattern(sd15, tmp_path):
    conv = "unet.down_blocks.0.resnets.0.conv1.weight"
    names = {k: f"unet.{m}" for k, m in SD15_UNET.items()}
    metadata = {"unet.r": RANK, "unet.lora_alpha": 2, "unet.alpha_pattern": {"down_blocks.0.resnets.0.conv1": 16}}
    written = write_file(tmp_path / "meta.safetensors", sd15, names, "peft-metadata",
                         alpha_of=lambda key: 16.0 if key == conv else 2.0, metadata=metadata)
    assert_merged_by_formula(sd15, written, merge(sd15, tmp_path, "meta"))


def test_a_file_without_alphas_merges_at_rank(sd15, tmp_path):
    names = {k: f"unet.{m}" for k, m in SD15_UNET.items()}
    written = write_file(tmp_path / "plain.safetensors", sd15, names, "peft", alpha_of=lambda key: None)
    assert_merged_by_formula(sd15, written, merge(sd15, tmp_path, "plain"))
    row = next(r for r in sd15.loras.describe() if r["name"] == "plain")
    assert (row["updates_with_alpha"], row["updates_at_rank"]) == (0, len(names))


def test_sdxl_kohya_te1_te2_and_peft_text_encoder_2(sdxl, tmp_path):
    kohya = {k: m for k, m in SDXL_UNET.items()} | {
        k: f"lora_{short}_{m.replace('.', '_')}" for k, (short, _, m) in SDXL_TEXT.items()}
    written = write_file(tmp_path / "xl_kohya.safetensors", sdxl, kohya, "kohya", alpha_of=lambda key: 1.0)
    assert_merged_by_formula(sdxl, written, merge(sdxl, tmp_path, "xl_kohya"))
    sdxl.loras.restore()
    peft = {k: f"unet.{m}" for k, m in SDXL_UNET.items()} | {k: f"{net}.{m}" for k, (_, net, m) in SDXL_TEXT.items()}
    written = write_file(tmp_path / "xl_peft.safetensors", sdxl, peft, "peft", alpha_of=lambda key: 3.0)
    assert_merged_by_formula(sdxl, written, merge(sdxl, tmp_path, "xl_peft"))


def test_an_alpha_that_belongs_to_no_update_is_refused_by_name(sd15, tmp_path):
    names = {k: f"unet.{m}" for k, m in SD15_UNET.items()}
    write_file(tmp_path / "stray.safetensors", sd15, names, "peft")
    tensors = load_file(str(tmp_path / "stray.safetensors"))
    save_file(tensors | {"unet.mid_block.no_such.alpha": torch.tensor(2.0)}, str(tmp_path / "stray.safetensors"))
    sd15.loras.folder = tmp_path
    before = {k: p.detach().clone() for k, p in sd15.bundle.unet.named_parameters()}
    with pytest.raises(InvalidRequestError, match="alpha entry 'unet.mid_block.no_such.alpha' belongs to no update"):
        sd15.loras.apply({"stray": WEIGHT})
    assert all(torch.equal(p, before[k]) for k, p in sd15.bundle.unet.named_parameters())
    row = next(r for r in sd15.loras.describe() if r["name"] == "stray")
    assert "unet.mid_block.no_such.alpha" in row["error"]


def diffusers_fused(model: str, path, names_prefix: str = "unet."):
    """diffusers' own load_lora_weights + fuse_lora(lora_scale) on the same tiny weights."""
    from diffusers import StableDiffusionPipeline

    from sdaot.runtime.registry import get_model
    from sdaot.runtime.weights import tiny_folder

    ref = StableDiffusionPipeline.from_pretrained(str(tiny_folder(get_model(model))), local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=WEIGHT)
    ref.unload_lora_weights()
    return ref


@pytest.mark.parametrize("layout", ["kohya", "peft-metadata"])
def test_unet_tensors_equal_diffusers_fuse_lora(sd15, tmp_path, layout):
    pytest.importorskip("peft", reason="diffusers' fuse_lora needs peft (a test dependency)")
    names = SD15_UNET if layout == "kohya" else {k: f"unet.{m}" for k, m in SD15_UNET.items()}
    modules = sorted(m.removeprefix("unet.") for m in names.values())
    metadata = {"unet.r": RANK, "unet.lora_alpha": 2, "unet.target_modules": modules} if layout != "kohya" else None
    written = write_file(tmp_path / "cmp.safetensors", sd15, names, layout, metadata=metadata)
    merge(sd15, tmp_path, "cmp")
    ref = diffusers_fused("SD1.5", tmp_path / "cmp.safetensors").unet.state_dict()
    ours = sd15.bundle.unet.state_dict()
    for key in written:
        torch.testing.assert_close(ours[key.removeprefix("unet.")], ref[key.removeprefix("unet.")],
                                   rtol=1e-5, atol=1e-5, msg=key)


def locon_image_request(backend: str):
    return parse_request(dict(model_name="SD1.5", prompt="a red cube", height=64, width=64, steps=3, seed=5,
                              backend=backend, loras={"locon": WEIGHT}))


def test_torch_image_equals_diffusers_fused_pipeline(tmp_path):
    pytest.importorskip("peft", reason="diffusers' fuse_lora needs peft (a test dependency)")
    pipe = load_pipeline("SD1.5", "tiny", lora_folder=tmp_path)
    write_file(tmp_path / "locon.safetensors", pipe, SD15_UNET, "kohya")
    got = pipe.generate(locon_image_request("torch"))
    assert_images_match_diffusers(got, tmp_path, tolerance=1)


def assert_images_match_diffusers(got, folder, tolerance):
    from sdaot.runtime.registry import get_model
    from sdaot.runtime.samplers import make_scheduler

    ref = diffusers_fused("SD1.5", folder / "locon.safetensors")
    ref.scheduler = make_scheduler(got.plan.sampler, get_model("SD1.5").scheduler_config)
    want = ref(prompt="a red cube", height=64, width=64, num_inference_steps=3, guidance_scale=got.plan.cfg_scale,
               generator=torch.Generator().manual_seed(5)).images[0]
    assert np.asarray(want).std() > 1, "reference image is flat: the comparison would prove nothing"
    diff = np.abs(np.asarray(got.images[0], dtype=np.int16) - np.asarray(want, dtype=np.int16)).max()
    assert diff <= tolerance or psnr(got.images[0], want) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_compiled_images_equal_diffusers_fused_pipeline(compiled_root, tmp_path, backend):
    pytest.importorskip("peft", reason="diffusers' fuse_lora needs peft (a test dependency)")
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=compiled_root, lora_folder=tmp_path)
    write_file(tmp_path / "locon.safetensors", pipe, SD15_UNET, "kohya")
    got = pipe.generate(locon_image_request(backend))
    assert set(got.backends.values()) == {backend}
    assert_images_match_diffusers(got, tmp_path, tolerance=1)
