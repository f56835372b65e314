"""Default CPU schedules keep every kernel's result exact (tiled transposes, parallel fallback); TVM uses every core."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import tvm
from tvm import te

from sdaot.compiler.cpu_schedule import apply_default_cpu_schedules

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def permute_kernel(shape: tuple[int, ...], perm: tuple[int, ...]) -> tvm.IRModule:
    source = te.placeholder(shape, name="source")

    def element(*index):
        where = [None] * len(shape)
        for out_axis, in_axis in enumerate(perm):
            where[in_axis] = index[out_axis]
        return source[tuple(where)]

    result = te.compute(tuple(shape[p] for p in perm), element, name="permuted")
    return tvm.IRModule({"main": te.create_prim_func([source, result])})


@pytest.mark.parametrize(("shape", "perm", "tiled"), [
    ((48, 16), (1, 0), True),            # a linear layer's weight
    ((2, 64, 24), (0, 2, 1), True),      # channels-last <-> channels-first
    ((2, 8, 16, 24), (0, 3, 1, 2), True),
    ((2, 8, 16, 24), (0, 2, 1, 3), False),  # innermost axis unchanged: plain parallel copy
    ((12, 6), (1, 0), False),            # not a multiple of the tile: plain parallel copy
])
def test_permuting_copies_are_exact_and_tiled_where_the_innermost_axis_changes(shape, perm, tiled):
    scheduled = apply_default_cpu_schedules(permute_kernel(shape, perm), TARGET)
    text = scheduled.script()
    assert "T.parallel" in text
    assert ("T.vectorized(8)" in text) == tiled
    library = tvm.compile(scheduled, target=TARGET)
    data = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = tvm.runtime.tensor(np.zeros([shape[p] for p in perm], np.float32))
    library(tvm.runtime.tensor(data), out)
    np.testing.assert_array_equal(out.numpy(), np.transpose(data, perm))


def test_arithmetic_kernels_get_the_parallel_fallback_and_stay_exact():
    a = te.placeholder((32, 24), name="a")
    b = te.placeholder((24, 16), name="b")
    k = te.reduce_axis((0, 24), name="k")
    c = te.compute((32, 16), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    scheduled = apply_default_cpu_schedules(tvm.IRModule({"main": te.create_prim_func([a, b, c])}), TARGET)
    assert "T.parallel" in scheduled.script()
    library = tvm.compile(scheduled, target=TARGET)
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
