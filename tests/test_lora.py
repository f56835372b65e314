"""LoRA: merged into the shared weights on every backend, restored exactly, no rebuild, no model copy."""

import hashlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import psnr

from sdaot.runtime.cli import main
from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.loader import load_pipeline
from sdaot.runtime.request import parse_request


def request(**kw):
    return parse_request(dict(model_name="SD1.5", prompt="a red cube", height=64, width=64, steps=3, seed=5) | kw)


def tree_digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_lora_changes_the_image_on_torch_and_tvm_alike_without_rebuild(compiled_root, lora_folder):
    import psutil

    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=compiled_root, lora_folder=lora_folder)
    before_files = tree_digest(compiled_root / "SD1.5")
    plain = {b: pipe.generate(request(backend=b)).images[0] for b in ("torch", "tvm", "onnxruntime")}
    rss = psutil.Process().memory_info().rss
    with_lora = {b: pipe.generate(request(backend=b, loras={"pixel_art": 0.8, "Logo": 0.5})) for b in
                 ("torch", "tvm", "onnxruntime")}
    grown = psutil.Process().memory_info().rss - rss
    for backend, result in with_lora.items():
        assert set(result.backends.values()) == {backend}
    assert not np.array_equal(np.asarray(plain["torch"]), np.asarray(with_lora["torch"].images[0]))
    assert psnr(with_lora["tvm"].images[0], with_lora["torch"].images[0]) >= 40
    assert psnr(with_lora["onnxruntime"].images[0], with_lora["torch"].images[0]) >= 40
    unet_bytes = sum(p.numel() * p.element_size() for p in pipe.bundle.unet.parameters())
    assert grown < unet_bytes, "a LoRA must not cost a copy of the model"
    for backend in ("torch", "tvm", "onnxruntime"):
        again = pipe.generate(request(backend=backend)).images[0]
        assert np.array_equal(np.asarray(again), np.asarray(plain[backend])), backend
    assert tree_digest(compiled_root / "SD1.5") == before_files


def test_weights_are_restored_bit_for_bit(lora_folder):
    pipe = load_pipeline("SD1.5", "tiny", lora_folder=lora_folder)
    original = {k: v.clone() for k, v in pipe.bundle.unet.state_dict().items()}
    pipe.generate(request(loras={"Pixel_Art": 1.0}))
    changed = [k for k, v in pipe.bundle.unet.state_dict().items() if not torch.equal(v, original[k])]
    assert any("attn1.to_q" in k for k in changed) and any("ff.net.2" in k for k in changed)
    pipe.generate(request())
    assert all(torch.equal(v, original[k]) for k, v in pipe.bundle.unet.state_dict().items())


@pytest.mark.parametrize(
    ("loras", "match"),
    [({"Nope": 0.5}, "unknown LoRA 'Nope'; available: Foreign, Logo, Mostly_Foreign, Pixel_Art, Sd2_Width, "
                      "Stray_Alpha, Text_Mlp"),
     ({"Pixel_Art": 4.5}, "outside"),
     ({"Foreign": 1.0}, "matches no weight"),
     ({"Mostly_Foreign": 1.0}, "Mostly_Foreign': 6 of its tensors match no weight of SD1.5 and only 2 do"),
     ({"Sd2_Width": 1.0}, r"attn2.to_k.weight is 32x1024 but SD1.5's weight is 32x32"),
     ({"Stray_Alpha": 1.0}, r"alpha entry 'unet.mid_block.to_q.alpha' belongs to no update")],
)
def test_bad_loras_are_clear_errors(lora_folder, loras, match):
    pipe = load_pipeline("SD1.5", "tiny", lora_folder=lora_folder)
    with pytest.raises(InvalidRequestError, match=match) as err:
        pipe.generate(request(loras=loras))
    assert err.value.param == "loras"


def test_cli_lora_flag(lora_folder, tmp_path):
    base = ["generate", "--model", "SD1.5", "--prompt", "x", "--height", "64", "--width", "64", "--steps", "2",
            "--lora-dir", str(lora_folder), "-o", str(tmp_path / "o.png")]
    assert CliRunner().invoke(main, [*base, "--lora", "Logo=0.7"]).exit_code == 0
    bad = CliRunner().invoke(main, [*base, "--lora", "Missing=0.7"])
    assert bad.exit_code == 2 and "error: loras: unknown LoRA" in bad.output


def test_a_lora_that_does_not_fit_changes_nothing_and_later_requests_run_on_the_base_weights(lora_folder):
    pipe = load_pipeline("SD1.5", "tiny", lora_folder=lora_folder)
    plain = pipe.generate(request()).images[0]
    pipe.generate(request(loras={"Logo": 1.0}))
    with_logo = {k: v.clone() for k, v in pipe.bundle.unet.state_dict().items()}
    with pytest.raises(InvalidRequestError, match="to_k"):
        pipe.generate(request(loras={"Sd2_Width": 1.0, "Pixel_Art": 0.5}))
    assert all(torch.equal(v, with_logo[k]) for k, v in pipe.bundle.unet.state_dict().items())
    assert np.array_equal(np.asarray(pipe.generate(request()).images[0]), np.asarray(plain))


def test_kohya_text_encoder_mlp_updates_are_merged_and_every_file_reports_its_matches(lora_folder):
    pipe = load_pipeline("SD1.5", "tiny", lora_folder=lora_folder)
    fc1 = pipe.bundle.text_encoders["text_encoder"].encoder.layers[0].mlp.fc1.weight
    before = fc1.detach().clone()
    pipe.generate(request(loras={"Text_Mlp": 1.0}))
    assert not torch.equal(fc1, before), "the MLP update of the text encoder was dropped"
    listing = {row["name"]: row for row in pipe.loras.describe()}
    assert listing["Text_Mlp"] == {"name": "Text_Mlp", "tensors_matched": 4, "tensors_unmatched": 0,
                                   "updates_with_alpha": 2, "updates_at_rank": 0}
    assert listing["Pixel_Art"] == {"name": "Pixel_Art", "tensors_matched": 6, "tensors_unmatched": 0,
                                    "updates_with_alpha": 3, "updates_at_rank": 0}
    assert "matches no weight" in listing["Foreign"]["error"]
    assert "6 of its tensors match no weight" in listing["Mostly_Foreign"]["error"]
