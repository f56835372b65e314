"""Matmuls in bf16 with fp32 accumulation (`--precision bf16`), on CPUs with AVX-512 BF16 (`Bf16MatmulRule`).

`vdpbf16ps` multiplies 32 bf16 pairs and adds them into 16 fp32 lanes: twice the multiply-adds of an fp32
FMA per instruction, from half the bytes. Linear layers and Winograd's 36 products (every 3x3
convolution under `--conv-algorithm winograd|auto`) run through it.

Graph rewrite (`Bf16Legalization`, used in place of relax.matmul's own legalization): both operands are rounded to bf16
(to nearest, ties to even) and kept as their 16-bit patterns (`uint16`), so TVM's bf16 legalization, which
turns every bf16 value back into fp32 arithmetic, never sees a bf16 type; the product widens each pattern
to fp32 (a 16-bit shift) and sums in fp32. Only matmuls whose reduction is even and whose columns are a
multiple of 16 are rewritten (every matmul of SD1.5 and SDXL is); the others stay fp32.

Schedule (`Bf16MatmulRule`), after matmul.py's register block, row chunks and packed panels:
1. The left-hand rounding stays a kernel of its own in the function (parallel rows, vector columns), so
   each value is rounded once and not once per column panel.
2. The right-hand rounding moves into the packing of each column panel, which is laid out as
   [reduction / 2, columns, 2]: the two values of a reduction pair side by side, as `vdpbf16ps` reads them.
3. The reduction is split in pairs; each (row, 16 columns, pair) of the register block becomes one
   `vdpbf16ps` (`BF16_DOT_INTRIN`), whose LLVM call is imported into the kernel as IR (TVM's LLVM code
   generator has no bf16 vector type of its own).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from ..relax_shapes import static_shape
from .blocking import KernelRule, static_extents
from .matmul import find_matmul, matmul_tiles, panel_blocked_loops, right_hand_read
from .profile import CpuProfile

LEFT = "bf16_left"
RIGHT = "bf16_right"
BLOCK_NAME = "matmul_bf16"
LANES = 16
PAIR = 2
BF16_DOT_INTRIN = "sdaot_dpbf16ps_16x2"
DOT_FUNCTION = "sdaot_dpbf16ps"
DOT_LLVM_IR = f"""
define internal <16 x float> @{DOT_FUNCTION}(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) alwaysinline {{
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""


def round_to_bf16(x: Any) -> Any:
    """The bf16 nearest to an fp32 value (ties to even), as its 16-bit pattern in the low half of a uint32."""
    bits = tirx.reinterpret("uint32", x)
    odd = (bits >> tirx.const(16, "uint32")) & tirx.const(1, "uint32")
    return (bits + tirx.const(0x7FFF, "uint32") + odd) >> tirx.const(16, "uint32")


def widen(pattern: Any) -> Any:
    """The fp32 value of a bf16 pattern (uint16)."""
    return tirx.reinterpret("float32", tirx.Cast("uint32", pattern) << tirx.const(16, "uint32"))


def widen_half(pair: Any, half: Any) -> Any:
    """The fp32 value of the low (half 0) or high (half 1) bf16 of a packed pair (uint32)."""
    shift = tirx.Cast("uint32", half) * tirx.const(16, "uint32")
    return tirx.reinterpret("float32", (pair >> shift) << tirx.const(16, "uint32"))


def _bf16_matmul_te(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    left = te.compute(a.shape, lambda *i: tirx.Cast("uint16", round_to_bf16(a(*i))), name=LEFT)

    def pair(*i: Any) -> Any:
        *lead, k, j = i
        low = round_to_bf16(b[(*lead, k * PAIR, j)])
        return low | (round_to_bf16(b[(*lead, k * PAIR + 1, j)]) << tirx.const(16, "uint32"))

    right = te.compute((*b.shape[:-2], b.shape[-2] // PAIR, b.shape[-1]), pair, name=RIGHT)
    k = te.reduce_axis((0, a.shape[-1]), name="k")
    shared_right = len(b.shape) == 2

    def product(*i: Any) -> Any:
        column = (k // PAIR, i[-1]) if shared_right else (*i[:-2], k // PAIR, i[-1])
        return te.sum(widen(left[(*i[:-1], k)]) * widen_half(right[column], k % PAIR), axis=k)

    return te.compute((*a.shape[:-1], b.shape[-1]), product, name=BLOCK_NAME)


def rewritable(a_shape: tuple[int, ...] | None, b_shape: tuple[int, ...] | None) -> bool:
    """Whether a matmul of these static shapes runs in bf16: an even reduction, columns in whole vectors, and
    a right-hand matrix shared by every batch or batched like the left."""
    if a_shape is None or b_shape is None or len(a_shape) < 2 or len(b_shape) < 2:
        return False
    if a_shape[-1] != b_shape[-2] or a_shape[-1] % PAIR or b_shape[-1] % LANES:
        return False
    return len(b_shape) == 2 or tuple(b_shape[:-2]) == tuple(a_shape[:-2])


class Bf16Legalization:
    """relax.matmul's legalization for `--precision bf16`: bf16 where `rewritable`, else relax's own fp32 one;
    counts the matmuls it rewrote."""

    def __init__(self) -> None:
        self.rewritten = 0

    def __call__(self, bb: Any, call: Any) -> Any:
        a, b = call.args
        if str(call.ty.dtype) != "float32" or not rewritable(static_shape(a), static_shape(b)):
            return call.op.get_attr("FLegalize")(bb, call)
        self.rewritten += 1
        return bb.call_te(_bf16_matmul_te, a, b, primfunc_name_hint=BLOCK_NAME)

    def legalization_map(self) -> dict[str, Any]:
        """The entries to give relax.transform.LegalizeOps."""
        return {"relax.matmul": self}


@T.prim_func(s_tir=True)
def _dot_description(
    A: T.Buffer((PAIR,), "uint16", offset_factor=1),
    B: T.Buffer((LANES,), "uint32", offset_factor=1),
    C: T.Buffer((LANES,), "float32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:LANES], A[0:PAIR], B[0:LANES])
        T.writes(C[0:LANES])
        for j, k in T.grid(LANES, PAIR):
            with T.sblock("update"):
                vj, vk = T.axis.remap("SR", [j, k])
                C[vj] = C[vj] + T.reinterpret("float32", T.Cast("uint32", A[vk]) << T.uint32(16)) * T.reinterpret(
                    "float32", B[vj] >> T.Cast("uint32", vk) * T.uint32(16) << T.uint32(16))


@T.prim_func(s_tir=True)
def _dot_implementation(
    A: T.Buffer((PAIR,), "uint16", offset_factor=1),
    B: T.Buffer((LANES,), "uint32", offset_factor=1),
    C: T.Buffer((LANES,), "float32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:LANES], A[0:PAIR], B[0:LANES])
        T.writes(C[0:LANES])
        C[T.ramp(0, 1, LANES)] = T.call_pure_extern(
            "float32x16", DOT_FUNCTION, C[T.ramp(0, 1, LANES)],
            T.broadcast(T.reinterpret("int32", A.vload([0], "uint16x2")), LANES),
            T.reinterpret("int32x16", B.vload([0], "uint32x16")))


@cache
def register_dot_intrinsic() -> str:
    """Register BF16_DOT_INTRIN with TVM once per process; returns its name."""
    s_tir.TensorIntrin.register(BF16_DOT_INTRIN, _dot_description, _dot_implementation)
    return BF16_DOT_INTRIN


class Bf16MatmulRule(KernelRule):
    """A function holding one bf16 matmul (from Bf16Legalization), its roundings and its epilogue."""

    def schedule(self, sch: Any, profile: CpuProfile) -> bool:
        found = find_matmul(sch, BLOCK_NAME) if profile.avx512_bf16 else None
        if found is None:
            return False
        matmul, output = found
        producers = {sch.get(p).name_hint: p for p in sch.get_producers(matmul)}
        if set(producers) != {LEFT, RIGHT}:
            return False
        *batch, row, column, reduction = sch.get_loops(matmul)
        extents = static_extents(sch, [row, column, reduction])
        tiles = matmul_tiles(*extents[:2], profile) if extents else None
        if tiles is None or tiles[1] % LANES:
            return False
        _round_left(sch, producers[LEFT], profile)
        right = right_hand_read(sch, matmul)
        panel, row_inner, column_inner = panel_blocked_loops(sch, matmul, output, batch, row, column, [reduction],
                                                             right, tiles, profile)
        sch.compute_inline(producers[RIGHT])
        pair_outer, pair = sch.split(reduction, [None, PAIR])
        vector, lane = sch.split(column_inner, [None, LANES])
        sch.reorder(pair_outer, row_inner, vector, lane, pair)
        sch.unroll(row_inner)
        sch.unroll(vector)
        _vectorize_panel(sch, panel)
        sch.decompose_reduction(matmul, pair_outer)
        sch.tensorize(lane, register_dot_intrinsic())
        sch.annotate(sch.get_loops(panel)[0], "pragma_import_llvm", DOT_LLVM_IR)
        return True


def _round_left(sch: Any, block: Any, profile: CpuProfile) -> None:
    *outer, inner = sch.get_loops(block)
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    _, lanes = sch.split(inner, [None, profile.lanes])
    sch.vectorize(lanes)


def _vectorize_panel(sch: Any, panel: Any) -> None:
    sch.vectorize(sch.get_loops(panel)[-1])


__all__ = ["Bf16Legalization", "Bf16MatmulRule", "rewritable", "round_to_bf16", "widen", "widen_half"]
