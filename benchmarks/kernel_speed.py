"""Time the hand-scheduled kernels alone, for one target, next to torch's own op on the same shapes.

The register blocks and tiles of compiler/kernels/ come from the target's CpuProfile; this script is how
their sizes were checked on each instruction set (the shapes are the full-size SD1.5 UNet's at 512x512,
batch 2). To hold torch to AVX2 as well, start it with the variables of benchmarks/peers.py's
ISA_LIMIT_VARIABLES:

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python benchmarks/kernel_speed.py --target '{"kind": "llvm", "mcpu": "znver3"}'

`--precision bf16` times the matmuls as `sdaot compile --precision bf16` builds them (operands rounded to
bf16, fp32 sums, `vdpbf16ps`); torch's column stays fp32, and the difference column shows bf16's error.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import tvm
from tvm import relax

from sdaot.compiler.kernels import apply_fallback_rules, apply_rules_before_tuning, cpu_profile
from sdaot.compiler.kernels.attention import fuse_attention
from sdaot.compiler.kernels.bf16_matmul import Bf16Legalization
from sdaot.runtime.targets import PRECISIONS, precision_target, resolve_target
from sdaot.runtime.threads import use_all_cores


def _graph(build) -> tvm.IRModule:
    builder = relax.BlockBuilder()
    params, body = build()
    with builder.function("main", params):
        with builder.dataflow():
            out = builder.emit_output(body(builder))
        builder.emit_func_output(out)
    return builder.get()


def _var(name: str, shape: tuple[int, ...]) -> relax.Var:
    return relax.Var(name, relax.TensorType(shape, "float32"))


def attention(heads: int = 8, queries: int = 4096, keys: int = 4096, depth: int = 40):
    shapes = [(2, heads, queries, depth), (2, heads, depth, keys), (2, heads, keys, depth)]

    def build():
        q, k, v = (_var(n, s) for n, s in zip("qkv", shapes, strict=True))
        return [q, k, v], lambda b: relax.op.matmul(b.emit(relax.op.nn.softmax(b.emit(relax.op.matmul(q, k)), -1)), v)

    def reference(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k.transpose(-1, -2), v, scale=1.0)

    flops = 2 * 2 * heads * queries * keys * depth * 2
    return fuse_attention(_graph(build)), shapes, reference, flops


def matmul(rows: int = 8192, inner: int = 320, columns: int = 1280, batch: tuple[int, ...] = ()):
    shapes = [(*batch, rows, inner), (*batch, inner, columns)]

    def build():
        a, b = _var("a", shapes[0]), _var("b", shapes[1])
        return [a, b], lambda _: relax.op.matmul(a, b)

    return _graph(build), shapes, torch.matmul, 2 * rows * inner * columns * int(np.prod(batch))


def convolution(channels: int = 320, size: int = 64, kernel: int = 3):
    shapes = [(2, channels, size, size), (channels, channels, kernel, kernel)]

    def build():
        x, w = _var("x", shapes[0]), _var("w", shapes[1])
        return [x, w], lambda _: relax.op.nn.conv2d(x, w, padding=kernel // 2)

    def reference(x, w):
        return torch.nn.functional.conv2d(x, w, padding=kernel // 2)

    return _graph(build), shapes, reference, 2 * 2 * channels * channels * size * size * kernel * kernel


KERNELS = {"attention 2x8x4096x4096x40": attention, "matmul 8192x320x1280": matmul,
           "matmul 8192x1280x320": lambda: matmul(8192, 1280, 320),
           "winograd products 6x6x320x320x512": lambda: matmul(320, 320, 512, (6, 6)),
           "conv3x3 2x320x64x64": convolution, "conv1x1 2x320x64x64": lambda: convolution(kernel=1),
           "conv3x3 2x1280x16x16": lambda: convolution(1280, 16)}


def _best_of(fn, inputs: list, repeat: int) -> float:
    fn(*inputs)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*inputs)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="cpu", help="cpu (this machine) or a JSON TVM target")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="", help="time only the kernels whose name contains this, e.g. attention")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    args = parser.parse_args()
    use_all_cores()
    target = precision_target(resolve_target(args.target), args.precision)
    if "num-cores" not in target.attrs:
        target = tvm.target.Target(json.loads(str(target)) | {"num-cores": torch.get_num_threads()})
    print(f"target {target} ({args.precision}): {cpu_profile(target).describe()}; torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print("| kernel | tvm s | tvm GFLOP/s | torch s | torch GFLOP/s | max rel. diff |\n|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, make in KERNELS.items():
        if args.only not in name:
            continue
        graph, shapes, reference, flops = make()
        if args.precision == "bf16":
            graph = relax.transform.LegalizeOps(Bf16Legalization().legalization_map())(graph)
        with target:
            scheduled = apply_rules_before_tuning(relax.get_pipeline("zero")(graph), target)
        vm = relax.VirtualMachine(tvm.compile(apply_fallback_rules(scheduled, target), target=target), tvm.cpu())
        inputs = [(rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32) for s in shapes]
        tvm_inputs = [tvm.runtime.tensor(x) for x in inputs]
        torch_inputs = [torch.from_numpy(x) for x in inputs]
        tvm_s = _best_of(vm["main"], tvm_inputs, args.repeat)
        with torch.inference_mode():
            torch_s = _best_of(reference, torch_inputs, args.repeat)
            expected = reference(*torch_inputs).numpy()
        got = vm["main"](*tvm_inputs).numpy()
        diff = float(np.abs(got - expected).max() / np.abs(expected).max())
        print(f"| {name} | {tvm_s:.4f} | {flops / tvm_s / 1e9:.1f} | {torch_s:.4f} | {flops / torch_s / 1e9:.1f} | "
              f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
