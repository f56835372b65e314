"""`sdaot compile --weight-transforms once`: what derives from the weights alone is computed at load and
again after any in-place weight change (LoRA), never served stale."""


import pytest
import torch
from click.testing import CliRunner

from sdaot.benchmarks.runner import relative_error
from sdaot.runtime.artifacts import Manifest, list_artifacts
from sdaot.runtime.cli import main
from sdaot.runtime.compiled import TvmComponent
from sdaot.runtime.component_table import component_modules
from sdaot.runtime.components import TorchComponent
from sdaot.runtime.registry import get_model
from sdaot.runtime.weights import load_weights

pytestmark = pytest.mark.slow  # full compiles: `make test` runs them, `make test-quick` does not


def test_transformed_weights_follow_in_place_weight_changes(tmp_path):
    result = CliRunner().invoke(main, ["compile", "--model", "SD1.5", "--resolution", "64x64", "--components",
                                       "vae_decoder", "--conv-algorithm", "winograd", "--weight-transforms", "once",
                                       "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (artifact,) = list_artifacts(tmp_path)
    assert artifact.manifest.weight_transforms == "once" and artifact.manifest.winograd_convolutions > 0
    module = component_modules(load_weights(get_model("SD1.5"), "tiny"))["vae_decoder"]
    compiled, reference = TvmComponent("vae_decoder", artifact, module), TorchComponent("vae_decoder", module)
    assert compiled.transform_seconds > 0, "the weights were transformed when the artifact was loaded"
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    before = compiled(latent)[0]
    assert relative_error(before, reference(latent)[0]) < 1e-4
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:  # convolution and linear weights, as a LoRA changes them
                param.mul_(1.0 + 0.2 * torch.rand(param.shape, generator=torch.Generator().manual_seed(len(name))))
    after = compiled(latent)[0]
    assert relative_error(after, before) > 1e-2, "the change is visible in the output"
    assert relative_error(after, reference(latent)[0]) < 1e-4


def test_per_call_weight_transforms_are_the_default(tmp_path):
    result = CliRunner().invoke(main, ["compile", "--model", "SD1.5", "--resolution", "64x64", "--components",
                                       "text_encoder", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = Manifest.read(next(tmp_path.rglob("manifest.json")).parent)
    assert manifest.weight_transforms == "per-call" and manifest.conv_algorithm == "direct"
