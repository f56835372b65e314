"""The CUDA runtime path end to end, in one command, on a machine with an NVIDIA GPU:

    python -m sdaot.benchmarks.gpu_check [--steps 20] [--out benchmarks/results/gpu-check]

1. compiles SD1.5 (full-size architecture, random weights: the cost of real ones) at 512x512 for this GPU's
   CUDA target, every component, into a scratch artifact root;
2. loads one pipeline on the GPU and generates the same image (prompt, seed, steps) with backend tvm,
   onnxruntime and torch, after a 2-step warm-up of each, timing each generation;
3. checks the tvm and onnxruntime images against torch's: PSNR >= 40 dB.

It writes `result.json` and the three PNGs to --out and exits 1 when a gate fails, 2 when torch sees no GPU.
onnxruntime on the GPU needs `onnxruntime-gpu` installed in place of `onnxruntime`; without it that row says
so and has no gate. Not run on the CPU-only machines this project is developed on (see the README).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

GATE_DB = 40.0
PROMPT = "a lighthouse on a cliff at sunset, oil painting"
BACKENDS = ("tvm", "onnxruntime", "torch")


@click.command()
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/gpu-check"),
              show_default=True)
def main(steps: int, out: Path) -> None:
    """Compile SD1.5 at 512x512 for this GPU, run tvm, onnxruntime and torch on it, check PSNR >= 40 dB."""
    if not torch.cuda.is_available():
        click.echo("error: torch sees no CUDA GPU here: this check runs on a machine with one", err=True)
        sys.exit(2)
    from sdaot.compiler.compile import compile_model
    from sdaot.compiler.options import BuildOptions
    from sdaot.runtime.loader import load_pipeline
    from sdaot.runtime.registry import get_model
    from sdaot.runtime.request import parse_request
    from sdaot.runtime.resolution import Resolution
    from sdaot.runtime.targets import resolve_target, target_key
    from sdaot.runtime.weights import load_weights

    from .report import machine_line
    from .runner import image_psnr

    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="sdaot-gpu-check-"))
    target = BuildOptions().check(resolve_target("cuda"))
    start = time.perf_counter()
    compile_model(load_weights(get_model("SD1.5"), "random"), [Resolution(512, 512)], None, None, target, root,
                  log=click.echo)
    report: dict = {"gpu": torch.cuda.get_device_name(), "target": target_key(target), "host": machine_line(),
                    "compile_seconds": round(time.perf_counter() - start, 1), "steps": steps, "gate_db": GATE_DB}
    pipe = load_pipeline("SD1.5", "random", artifacts_root=root, device="cuda")
    request = {"model_name": "SD1.5", "prompt": PROMPT, "width": 512, "height": 512, "seed": 0}
    images, rows = {}, {}
    for backend in BACKENDS:
        try:
            pipe.generate(parse_request(request | {"backend": backend, "steps": 2}))
            torch.cuda.synchronize()
            result = pipe.generate(parse_request(request | {"backend": backend, "steps": steps}))
        except Exception as exc:  # a backend that cannot run here is reported, the others still run
            rows[backend] = {"status": f"not run: {exc}"}
            click.echo(f"{backend}: not run: {exc}")
            continue
        images[backend] = result.images[0]
        result.images[0].save(out / f"{backend}.png")
        rows[backend] = {"status": "ok", "seconds": round(result.inference_time, 3), "backends": result.backends}
        click.echo(f"{backend}: {result.inference_time:.2f} s for {steps} steps ({result.backends})")
    failed = []
    for backend in ("tvm", "onnxruntime"):
        if backend in images and "torch" in images:
            psnr = round(image_psnr(images[backend], images["torch"]), 2)
            rows[backend]["psnr_db_vs_torch"] = psnr
            if psnr < GATE_DB:
                failed.append(f"{backend} {psnr} dB")
    report["backends"] = rows
    report["passed"] = not failed and "tvm" in images
    (out / "result.json").write_text(json.dumps(report, indent=2) + "\n")
    click.echo(json.dumps(report, indent=2))
    if not report["passed"]:
        click.echo(f"error: gate failed: {', '.join(failed) or 'tvm did not run'}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
