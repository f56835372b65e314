"""The hand-written CPU kernels keep every result exact, built for AVX2 and for this machine's own CPU (an AVX2
library runs on an AVX-512 machine), and size their register blocks from the target; TVM uses every core."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import tvm
from conftest import ISA_TARGETS, isa_target, matmul_graph
from tvm import relax, te

from sdaot.compiler.kernels import apply_fallback_rules, apply_rules_before_tuning, cpu_profile
from sdaot.compiler.kernels.attention import attention_tiles, fuse_attention
from sdaot.compiler.kernels.convolution import convolution_tiles
from sdaot.compiler.kernels.matmul import FEWEST_CHUNK_ROWS, matmul_tiles, register_blocks_per_chunk
from sdaot.compiler.kernels.transpose import transpose_tile

AVX512 = cpu_profile(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"}))
AVX2 = cpu_profile(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}))


def permute_kernel(shape: tuple[int, ...], perm: tuple[int, ...]) -> tvm.IRModule:
    source = te.placeholder(shape, name="source")

    def element(*index):
        where = [None] * len(shape)
        for out_axis, in_axis in enumerate(perm):
            where[in_axis] = index[out_axis]
        return source[tuple(where)]

    result = te.compute(tuple(shape[p] for p in perm), element, name="permuted")
    return tvm.IRModule({"main": te.create_prim_func([source, result])})


@pytest.mark.parametrize("isa", ISA_TARGETS)
@pytest.mark.parametrize(("shape", "perm", "tiled"), [
    ((48, 16), (1, 0), True),            # a linear layer's weight
    ((2, 64, 24), (0, 2, 1), True),      # channels-last <-> channels-first
    ((2, 8, 16, 24), (0, 3, 1, 2), True),
    ((2, 8, 16, 24), (0, 2, 1, 3), False),  # innermost axis unchanged: plain parallel copy
    ((12, 6), (1, 0), False),            # not a multiple of the tile: plain parallel copy
])
def test_permuting_copies_are_exact_and_tiled_where_the_innermost_axis_changes(shape, perm, tiled, isa):
    target = isa_target(isa)
    scheduled = apply_fallback_rules(permute_kernel(shape, perm), target)
    text = scheduled.script()
    assert "T.parallel" in text
    assert ("T.vectorized(8)" in text) == tiled
    library = tvm.compile(scheduled, target=target)
    data = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = tvm.runtime.tensor(np.zeros([shape[p] for p in perm], np.float32))
    library(tvm.runtime.tensor(data), out)
    np.testing.assert_array_equal(out.numpy(), np.transpose(data, perm))


@pytest.mark.parametrize("isa", ISA_TARGETS)
def test_arithmetic_kernels_get_the_parallel_fallback_and_stay_exact(isa):
    target = isa_target(isa)
    a = te.placeholder((32, 24), name="a")
    b = te.placeholder((24, 16), name="b")
    k = te.reduce_axis((0, 24), name="k")
    c = te.compute((32, 16), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    scheduled = apply_fallback_rules(tvm.IRModule({"main": te.create_prim_func([a, b, c])}), target)
    assert "T.parallel" in scheduled.script()
    library = tvm.compile(scheduled, target=target)
    rng = np.random.default_rng(1)
    x, y = rng.random((32, 24), dtype=np.float32), rng.random((24, 16), dtype=np.float32)
    out = tvm.runtime.tensor(np.zeros((32, 16), np.float32))
    library(tvm.runtime.tensor(x), tvm.runtime.tensor(y), out)
    np.testing.assert_allclose(out.numpy(), x @ y, rtol=1e-5)


def tvm_threads_in_fresh_process(env: dict[str, str]) -> int:
    code = ("from sdaot.runtime.threads import use_all_cores; use_all_cores(); import tvm; "
            "print(tvm.get_global_func('runtime.NumThreads')())")
    clean = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def test_tvm_kernels_use_as_many_threads_as_torch_unless_told_otherwise():
    assert tvm_threads_in_fresh_process({}) == torch.get_num_threads()
    assert tvm_threads_in_fresh_process({"TVM_NUM_THREADS": "1"}) == 1


def fused_convolution(shape: tuple[int, int, int, int], out_channels: int, kernel: int, stride: int,
                      epilogue: bool, target: tvm.target.Target) -> tvm.IRModule:
    """conv2d (+ bias + residual + a per-sample embedding, as in a UNet resnet block), legalized and fused."""
    n, c, h, w = shape
    out_h, out_w = ((d + 2 * (kernel // 2) - kernel) // stride + 1 for d in (h, w))
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    weight = relax.Var("weight", relax.TensorType((out_channels, c, kernel, kernel), "float32"))
    bias = relax.Var("bias", relax.TensorType((1, out_channels, 1, 1), "float32"))
    emb = relax.Var("emb", relax.TensorType((n, out_channels), "float32"))
    residual = relax.Var("residual", relax.TensorType((n, out_channels, out_h, out_w), "float32"))
    builder = relax.BlockBuilder()
    params = [x, weight, bias, emb, residual] if epilogue else [x, weight]
    with builder.function("main", params):
        with builder.dataflow():
            y = builder.emit(relax.op.nn.conv2d(x, weight, strides=stride, padding=kernel // 2))
            if epilogue:
                y = builder.emit(relax.op.add(y, bias))
                y = builder.emit(relax.op.add(y, relax.op.expand_dims(emb, [2, 3])))
                y = builder.emit(relax.op.add(y, residual))
            out = builder.emit_output(y)
        builder.emit_func_output(out)
    with target:
        return relax.get_pipeline("zero")(builder.get())


@pytest.mark.parametrize("isa", ISA_TARGETS)
@pytest.mark.parametrize(("shape", "out_channels", "kernel", "stride", "epilogue"), [
    ((2, 8, 16, 16), 12, 3, 1, True),    # a resnet conv: bias, timestep embedding and residual fused in
    ((1, 6, 12, 20), 4, 3, 1, False),    # width not a multiple of 8, channels not of 8
    ((2, 8, 16, 16), 16, 1, 1, True),    # 1x1 (shortcut, proj_in/out)
    ((1, 8, 16, 16), 8, 3, 2, False),    # downsampler
    ((1, 3, 8, 136), 5, 3, 1, False),    # wide image: row-first order
])
def test_convolutions_get_the_register_blocked_schedule_and_stay_exact(shape, out_channels, kernel, stride,
                                                                       epilogue, isa):
    target = isa_target(isa)
    fused = fused_convolution(shape, out_channels, kernel, stride, epilogue, target)
    convs = apply_rules_before_tuning(fused, target)
    kernels = [gv for gv, f in convs.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and convs[kernels[0]].attrs["tirx.is_scheduled"]
    script = convs[kernels[0]].script()
    assert "T.vectorized" in script and "local" in script
    assert ("_global" in script) == (kernel == 1), "1x1 convolutions are matmuls with packed image panels"
    library = relax.VirtualMachine(tvm.compile(apply_fallback_rules(convs, target), target=target), tvm.cpu())
    rng = np.random.default_rng(2)
    n, c, h, w = shape
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    weight = torch.from_numpy(rng.standard_normal((out_channels, c, kernel, kernel), dtype=np.float32))
    expected = torch.nn.functional.conv2d(x, weight, stride=stride, padding=kernel // 2)
    args = [x, weight]
    if epilogue:
        extras = [torch.from_numpy(rng.standard_normal(s, dtype=np.float32))
                  for s in ((1, out_channels, 1, 1), (n, out_channels), tuple(expected.shape))]
        expected = expected + extras[0] + extras[1][:, :, None, None] + extras[2]
        args += extras
    out = library["main"](*(tvm.runtime.tensor(a.numpy()) for a in args))
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def fused_matmul(a_shape: tuple[int, ...], b_shape: tuple[int, ...], bias: bool,
                 target: tvm.target.Target) -> tvm.IRModule:
    with target:
        return relax.get_pipeline("zero")(matmul_graph(a_shape, b_shape, bias))


@pytest.mark.parametrize("isa", ISA_TARGETS)
@pytest.mark.parametrize(("a_shape", "b_shape", "bias", "blocked"), [
    ((1, 77, 48), (48, 64), True, True),           # a linear layer on 77 text tokens (7-row blocks)
    ((2, 3, 16, 8), (2, 3, 8, 48), False, True),   # attention scores per head
    ((520, 40), (40, 96), True, True),             # several row chunks, each packing three column panels
    ((2, 16, 24), (24, 20), True, False),          # 20 columns: no power-of-two vector, left to the fallback
])
def test_matmuls_get_register_blocks_where_the_columns_allow_and_stay_exact(a_shape, b_shape, bias, blocked, isa):
    target = isa_target(isa)
    scheduled = apply_rules_before_tuning(fused_matmul(a_shape, b_shape, bias, target), target)
    kernel = next(f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    assert bool(kernel.attrs and kernel.attrs.get("tirx.is_scheduled")) == blocked
    assert ("b_global" in kernel.script()) == blocked, "blocked matmuls read packed panels of b"
    library = relax.VirtualMachine(tvm.compile(apply_fallback_rules(scheduled, target), target=target),
                                   tvm.cpu())
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal(s, dtype=np.float32) for s in (a_shape, b_shape))
    c = rng.standard_normal(b_shape[-1], dtype=np.float32)
    out = library["main"](*(tvm.runtime.tensor(x) for x in ([a, b, c] if bias else [a, b])))
    np.testing.assert_allclose(out.numpy(), a @ b + (c if bias else 0), rtol=1e-4, atol=1e-4)


def test_profiles_come_from_the_target():
    assert (AVX512.isa, AVX512.lanes, AVX512.vector_registers, AVX512.avx512_bf16) == ("avx512", 16, 32, True)
    assert (AVX2.isa, AVX2.lanes, AVX2.vector_registers, AVX2.avx512_bf16) == ("avx2", 8, 16, False)
    no_avx512 = cpu_profile(tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "mattr": ["-avx512f"]}))
    assert (no_avx512.lanes, no_avx512.vector_registers) == (8, 16)
    arm = cpu_profile(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1"}))
    assert (arm.isa, arm.lanes, arm.vector_registers) == ("neon", 4, 32)
    assert AVX2.l1_bytes > 0 and AVX2.l2_bytes > AVX2.l1_bytes and "avx2" in AVX2.describe()


def test_register_blocks_fit_the_register_file():
    """AVX-512 keeps the blocks measured on a Zen 4; AVX2 gets blocks of 8-lane vectors that fit 16 registers."""
    assert (AVX512.accumulators, AVX2.accumulators) == (16, 12)
    assert convolution_tiles(320, 64, AVX512) == (8, 32)
    assert convolution_tiles(1280, 16, AVX512) == (8, 16)
    assert convolution_tiles(4, 64, AVX512) == (4, 32)
    assert convolution_tiles(3, 20, AVX512) == (3, 4)
    assert convolution_tiles(320, 64, AVX2) == (5, 16)
    assert convolution_tiles(128, 64, AVX2) == (4, 16)
    assert matmul_tiles(77, 3072, AVX512) == (7, 32)
    assert matmul_tiles(4096, 40, AVX512) == (8, 8)
    assert matmul_tiles(16, 20, AVX512) is None
    assert matmul_tiles(4096, 320, AVX2) == (4, 16)
    assert matmul_tiles(77, 3072, AVX2) == (7, 8)
    assert attention_tiles(4096, 4096, 40, AVX512) == (32, 8, 8)
    assert attention_tiles(4096, 4096, 40, AVX2) == (16, 4, 5)
    assert transpose_tile(AVX512) == transpose_tile(AVX2) == 8
    for profile in (AVX512, AVX2):
        for rows, depth, block_rows in ((8192, 320, 8), (8192, 2560, 4), (154, 768, 7), (520, 40, 8)):
            chunk = block_rows * register_blocks_per_chunk(rows, depth, block_rows, profile)
            assert rows % chunk == 0 and chunk >= min(rows // 5, FEWEST_CHUNK_ROWS)
        for rows, columns in ((4096, 320), (77, 3072), (8192, 1280)):
            height, width = matmul_tiles(rows, columns, profile)
            assert height * max(1, width // profile.lanes) <= profile.accumulators
        for queries, keys, width in ((4096, 4096, 40), (1024, 1024, 80), (4096, 77, 40), (256, 256, 160)):
            block, key_tile, column_tile = attention_tiles(queries, keys, width, profile)
            assert max(key_tile, column_tile) * (block // profile.lanes) <= profile.accumulators
            channels, width = convolution_tiles(columns, 64, profile)
            assert channels * max(1, width // profile.lanes) <= profile.accumulators


def attention_graph(heads: int, queries: int, keys: int, depth: int) -> tvm.IRModule:
    shapes = {"q": (2, heads, queries, depth), "key_t": (2, heads, depth, keys), "value": (2, heads, keys, depth)}
    params = {name: relax.Var(name, relax.TensorType(shape, "float32")) for name, shape in shapes.items()}
    builder = relax.BlockBuilder()
    with builder.function("main", list(params.values())):
        with builder.dataflow():
            scores = builder.emit(relax.op.matmul(params["q"], params["key_t"]))
            probs = builder.emit(relax.op.nn.softmax(scores, axis=-1))
            out = builder.emit_output(builder.emit(relax.op.matmul(probs, params["value"])))
        builder.emit_func_output(out)
    return builder.get()


@pytest.mark.parametrize("isa", ISA_TARGETS)
@pytest.mark.parametrize(("queries", "keys", "fused"), [(48, 64, True), (32, 77, True), (20, 64, False)])
def test_attention_is_one_kernel_with_a_cached_score_block_and_stays_exact(queries, keys, fused, isa):
    target = isa_target(isa)
    graph = fuse_attention(attention_graph(3, queries, keys, 40))
    assert any(gv.name_hint.startswith("fused_attention") for gv in graph.get_global_vars()) == fused
    with target:
        built = apply_rules_before_tuning(relax.get_pipeline("zero")(graph), target)
    kernels = {gv.name_hint: f for gv, f in built.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    if fused:
        (kernel,) = kernels.values()
        assert kernel.attrs["tirx.is_scheduled"] and "T.parallel" in kernel.script()
    library = relax.VirtualMachine(tvm.compile(apply_fallback_rules(built, target), target=target), tvm.cpu())
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 3, queries, 40), dtype=np.float32)
    key_t = rng.standard_normal((2, 3, 40, keys), dtype=np.float32)
    value = rng.standard_normal((2, 3, keys, 40), dtype=np.float32)
    out = library["main"](*(tvm.runtime.tensor(x) for x in (q, key_t, value)))
    expected = torch.softmax(torch.from_numpy(q) @ torch.from_numpy(key_t), dim=-1) @ torch.from_numpy(value)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
