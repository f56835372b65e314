"""Shared fixtures: a private cache for tiny weights (built once per test session) and loaded pipelines."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdaot.runtime.threads import use_all_cores

_CACHE = Path(tempfile.mkdtemp(prefix="sdaot-test-cache-"))
os.environ.setdefault("SDAOT_CACHE", str(_CACHE))
use_all_cores()

from sdaot.benchmarks.runner import image_psnr  # noqa: E402  (after the cache and thread settings above)


@pytest.fixture(scope="session")
def pipelines():
    """Load each model's tiny pipeline once per session: pipelines(name, refiner=False)."""
    from sdaot.runtime.loader import load_pipeline

    loaded = {}

    def get(name: str, refiner: bool = False):
        key = (name, refiner)
        if key not in loaded:
            loaded[key] = load_pipeline(name, "tiny", with_refiner=refiner)
        return loaded[key]

    return get


FAMILIES = ["SD1.5", "SD2", "SDXL1.0-base"]


def run_compiles(commands: list[list[str]], logs: Path) -> list[str]:
    """Run `sdaot compile` commands (their arguments after `compile`) as processes side by side, since one
    compile keeps one core busy, and return their outputs; a failing one fails the caller with its output."""
    logs.mkdir(parents=True, exist_ok=True)
    running = []
    for index, args in enumerate(commands):
        log = (logs / f"compile-{index}.log").open("w")
        running.append((subprocess.Popen([sys.executable, "-m", "sdaot.runtime.cli", "compile", *args],
                                         stdout=log, stderr=subprocess.STDOUT), log))
    outputs = []
    for process, log in running:
        code = process.wait()
        log.close()
        outputs.append(Path(log.name).read_text())
        assert code == 0, outputs[-1]
    return outputs


@pytest.fixture(scope="session")
def compiled_root(tmp_path_factory):
    """One real `sdaot compile` per family at 64x64 (all components), shared by the tests below. SD1.5 is built
    with Winograd convolutions and weights transformed once (so the LoRA tests cover their refresh), the
    others with the defaults (direct convolutions, per-call weight transforms)."""
    root = tmp_path_factory.mktemp("artifacts")
    commands = [["--model", model, "--weights", "tiny", "--resolution", "64x64", "--out", str(root),
                 *(["--conv-algorithm", "winograd", "--weight-transforms", "once"] if model == "SD1.5" else [])]
                for model in FAMILIES]
    for output in run_compiles(commands, tmp_path_factory.mktemp("compile-logs")):
        assert "[1/" in output and "built TVM library" in output
    return root


psnr = image_psnr

AVX2_TARGET = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}


def _isa_targets() -> dict[str, dict]:
    """The instruction sets kernel tests build for, by test id: AVX2 (the oldest CPU the project supports;
    its code runs on AVX-512 machines too) and this machine's own CPU where that is a different one."""
    import json

    import tvm

    from sdaot.compiler.kernels import cpu_profile

    host = tvm.target.Target.from_device(tvm.cpu())
    isa = cpu_profile(host).isa
    targets = {"avx2": AVX2_TARGET}
    if isa != "avx2":
        targets[f"host-{isa}"] = json.loads(str(host)) | {"num-cores": 2}
    return targets


ISA_TARGET_SPECS = _isa_targets()
ISA_TARGETS = list(ISA_TARGET_SPECS)


def matmul_graph(a_shape: tuple[int, ...], b_shape: tuple[int, ...], bias: bool):
    """A Relax module `main(a, b[, c]) = a @ b (+ c)`, c a bias over the columns."""
    from tvm import relax

    a = relax.Var("a", relax.TensorType(a_shape, "float32"))
    b = relax.Var("b", relax.TensorType(b_shape, "float32"))
    c = relax.Var("c", relax.TensorType((b_shape[-1],), "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [a, b, c] if bias else [a, b]):
        with builder.dataflow():
            y = builder.emit(relax.op.matmul(a, b))
            if bias:
                y = builder.emit(relax.op.add(y, c))
            out = builder.emit_output(y)
        builder.emit_func_output(out)
    return builder.get()


def isa_target(name: str):
    """The TVM target of one ISA_TARGETS entry."""
    import tvm

    return tvm.target.Target(ISA_TARGET_SPECS[name])


ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"


def make_loras(folder):
    """A kohya-named LoRA (alpha scaling, UNet + text encoder), a PEFT-named one, and one for another model."""
    folder.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    kohya = {}
    for module, width in ((f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q", 32),
                          (f"lora_unet_{ATTN.replace('.', '_')}_ff_net_2", 32),
                          ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 32)):
        rank = 4
        inner = 128 if module.endswith("ff_net_2") else width
        kohya[f"{module}.lora_down.weight"] = torch.randn(rank, inner, generator=gen)
        kohya[f"{module}.lora_up.weight"] = torch.randn(width, rank, generator=gen) * 0.5
        kohya[f"{module}.alpha"] = torch.tensor(2.0)
    save_file(kohya, str(folder / "Pixel_Art.safetensors"))
    peft = {f"unet.{ATTN}.attn2.to_v.lora_A.weight": torch.randn(4, 32, generator=gen),
            f"unet.{ATTN}.attn2.to_v.lora_B.weight": torch.randn(32, 4, generator=gen)}
    save_file(peft, str(folder / "Logo.safetensors"))
    foreign = {"unet.no_such_block.to_q.lora_A.weight": torch.randn(4, 8),
               "unet.no_such_block.to_q.lora_B.weight": torch.randn(8, 4)}
    save_file(foreign, str(folder / "Foreign.safetensors"))
    # An SD2-sized update on to_k (1024 context features, not 32) after one that fits: nothing may be merged.
    other_width = {f"unet.{ATTN}.attn1.to_q.lora_A.weight": torch.randn(4, 32, generator=gen),
                   f"unet.{ATTN}.attn1.to_q.lora_B.weight": torch.randn(32, 4, generator=gen),
                   f"unet.{ATTN}.attn2.to_k.lora_A.weight": torch.randn(4, 1024, generator=gen),
                   f"unet.{ATTN}.attn2.to_k.lora_B.weight": torch.randn(32, 4, generator=gen)}
    save_file(other_width, str(folder / "Sd2_Width.safetensors"))
    # kohya, the text encoder part touching only its MLP (converted by diffusers to another key style).
    mlp = {}
    for module, shape in (("lora_te_text_model_encoder_layers_0_mlp_fc1", (37, 32)),
                          (f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q", (32, 32))):
        mlp[f"{module}.lora_down.weight"] = torch.randn(4, shape[1], generator=gen)
        mlp[f"{module}.lora_up.weight"] = torch.randn(shape[0], 4, generator=gen)
        mlp[f"{module}.alpha"] = torch.tensor(4.0)
    save_file(mlp, str(folder / "Text_Mlp.safetensors"))
    # One update that fits and three for blocks this model does not have.
    mostly = {f"unet.{ATTN}.attn2.to_v.lora_A.weight": torch.randn(4, 32, generator=gen),
              f"unet.{ATTN}.attn2.to_v.lora_B.weight": torch.randn(32, 4, generator=gen)}
    for block in ("mid_block.no_such_1", "mid_block.no_such_2", "mid_block.no_such_3"):
        mostly |= {f"unet.{block}.to_q.lora_A.weight": torch.randn(4, 8, generator=gen),
                   f"unet.{block}.to_q.lora_B.weight": torch.randn(8, 4, generator=gen)}
    save_file(mostly, str(folder / "Mostly_Foreign.safetensors"))
    # An update with its alpha, and an alpha that belongs to no update: refused, never merged at a guess.
    stray = {f"unet.{ATTN}.attn2.to_v.lora_A.weight": torch.randn(4, 32, generator=gen),
             f"unet.{ATTN}.attn2.to_v.lora_B.weight": torch.randn(32, 4, generator=gen),
             f"unet.{ATTN}.attn2.to_v.alpha": torch.tensor(2.0), "unet.mid_block.to_q.alpha": torch.tensor(2.0)}
    save_file(stray, str(folder / "Stray_Alpha.safetensors"))
    return folder


@pytest.fixture(scope="session")
def lora_folder(tmp_path_factory):
    return make_loras(tmp_path_factory.mktemp("loras"))
