"""Linear layers in bf16 on AMX tiles (`--precision bf16` for a target with AMX-BF16): `tdpbf16ps`.

One `tdpbf16ps` multiplies a 16 x 32 bf16 tile by a 32 x 16 one (stored as 16 rows of 16 bf16 pairs, the
"VNNI" layout) into a 16 x 16 fp32 tile: 16 times the multiply-adds of a `vdpbf16ps`. TVM 0.27 has no AMX
intrinsics, so the kernel calls LLVM's x86 ones directly from TIR (`T.call_llvm_intrin`: `ldtilecfg`,
`tilezero`, `tileloadd64`, `tdpbf16ps`, `tilestored64`, `tilerelease`, tile numbers as immediates); LLVM
accepts them only for targets with `+amx-tile,+amx-bf16`, so the rewrite is chosen from the target
(`AmxLegalization.applies`), never by trying. Running them needs Linux's permission (runtime/amx.py).

Graph rewrite (`AmxLegalization`, in place of relax.matmul's legalization) for a matmul whose right-hand
matrix is shared by every row (a linear layer: [..., K] @ [K, N]) with K and N multiples of 32; any other
matmul goes to bf16_matmul.py's `vdpbf16ps` rewrite, as on a CPU without AMX:
1. Left rounding (`amx_left`): the rows, flattened over the leading dimensions and padded with zeros to
   a multiple of 32, rounded to bf16 (ties to even) as uint16 patterns, row-major.
2. Right packing (`amx_right`): the right-hand matrix rounded to bf16 and laid out as [N / 16, K / 2, 32]:
   for each 16 columns, K / 2 rows of 64 bytes holding the 16 (k, k + 1) pairs, which is what one
   `tileloadd64` with a 64-byte stride reads as a B tile. It reads the weights alone, so under
   `--weight-transforms once` it is lifted out and computed at load time.
3. Tile kernel (`amx_matmul`, hand-scheduled: dlight and tuning leave it alone): one parallel task per
   32 x 32 block of the result. Each task fills a tile configuration in a 64-byte aligned slot of its own
   stack (tile configuration is per thread; 8 tiles of 16 rows x 64 bytes) and loads it, zeroes the four
   accumulator tiles (0-3), then for each 32 values of the reduction loads two A tiles (4, 5) and two
   B tiles (6, 7) and issues the four `tdpbf16ps` of the 2 x 2 block, stores the accumulators as fp32 and
   releases the tiles.
4. Epilogue: the padding rows are sliced off and the rows reshaped back to the leading dimensions; a bias
   or activation after the matmul stays a kernel of its own (the tile kernel is opaque to FuseOps).
"""

from __future__ import annotations

from functools import reduce
from typing import Any

from tvm import relax, te, tirx
from tvm.script import tirx as T

from ..relax_shapes import static_shape
from .bf16_matmul import Bf16Legalization, round_to_bf16
from .profile import CpuProfile

LEFT = "amx_left"
RIGHT = "amx_right"
KERNEL = "amx_matmul"
TILE_ROWS = 16
STEP = 32
"""Reduction values per A tile (16 rows x 64 bytes of bf16) and rows/columns of one task's 2 x 2 tiles."""
PAIR = 2
ROW_BYTES = 64
PALETTE = 1


def amx_rewritable(a_shape: tuple[int, ...] | None, b_shape: tuple[int, ...] | None) -> bool:
    """Whether a matmul of these static shapes runs on AMX tiles: a 2-D right-hand matrix shared by all rows,
    the reduction and the columns in whole tiles (multiples of 32)."""
    if a_shape is None or b_shape is None or len(a_shape) < 2 or len(b_shape) != 2:
        return False
    depth, columns = b_shape
    return a_shape[-1] == depth and depth % STEP == 0 and columns % STEP == 0


def _padded(rows: int) -> int:
    return -(-rows // STEP) * STEP


def _left_te(a: te.Tensor) -> te.Tensor:
    *lead, depth = (int(d) for d in a.shape)
    rows = reduce(lambda x, y: x * y, lead, 1)

    def rounded(i: Any, k: Any) -> Any:
        index, flat = [], i
        for extent in reversed(lead):
            index.append(flat % extent)
            flat = flat // extent
        value = tirx.Cast("uint16", round_to_bf16(a[(*reversed(index), k)]))
        return tirx.if_then_else(i < rows, value, tirx.const(0, "uint16"))

    return te.compute((_padded(rows), depth), rounded, name=LEFT)


def _right_te(b: te.Tensor) -> te.Tensor:
    depth, columns = (int(d) for d in b.shape)

    def packed(j: Any, pair: Any, lane: Any) -> Any:
        value = b[pair * PAIR + lane % PAIR, j * TILE_ROWS + lane // PAIR]
        return tirx.Cast("uint16", round_to_bf16(value))

    return te.compute((columns // TILE_ROWS, depth // PAIR, TILE_ROWS * PAIR), packed, name=RIGHT)


def _tile(name: str, *args: Any) -> Any:
    return T.evaluate(T.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def amx_matmul_kernel(rows: int, depth: int, columns: int) -> tirx.PrimFunc:
    """The tile kernel (step 3): out[rows, columns] (fp32) = left[rows, depth] @ right, `left` bf16 patterns
    row-major, `right` packed as step 2 lays it out; rows, depth and columns multiples of 32."""
    column_blocks = columns // STEP
    tasks = rows // STEP * column_blocks
    left_stride = T.int64(depth * 2)
    out_stride = T.int64(columns * 4)
    row_bytes = T.int64(ROW_BYTES)

    @T.prim_func(private=True)
    def kernel(left: T.Buffer((rows, depth), "uint16"),
               right: T.Buffer((columns // TILE_ROWS, depth // PAIR, TILE_ROWS * PAIR), "uint16"),
               out: T.Buffer((rows, columns), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for task in T.parallel(tasks):
            slot = T.decl_buffer((2 * ROW_BYTES,), "uint8")
            aligned: T.let[T.handle] = T.call_llvm_pure_intrin(
                "handle", "llvm.ptrmask", slot.access_ptr("rw", offset=ROW_BYTES - 1, extent=ROW_BYTES + 1),
                T.int64(-ROW_BYTES))
            config = T.decl_buffer((ROW_BYTES,), "uint8", data=aligned)
            for byte in range(ROW_BYTES):
                config[byte] = T.uint8(0)
            config[0] = T.uint8(PALETTE)
            for t in T.unroll(8):
                config[16 + 2 * t] = T.uint8(ROW_BYTES)
                config[48 + t] = T.uint8(TILE_ROWS)
            _tile("ldtilecfg", T.address_of(config[0]))
            r = task // column_blocks * STEP
            c = task % column_blocks * STEP
            for t in T.unroll(4):
                _tile("tilezero", T.int8(t))
            for k in range(depth // STEP):
                _tile("tileloadd64", T.int8(4), T.address_of(left[r, k * STEP]), left_stride)
                _tile("tileloadd64", T.int8(5), T.address_of(left[r + TILE_ROWS, k * STEP]), left_stride)
                _tile("tileloadd64", T.int8(6), T.address_of(right[c // TILE_ROWS, k * TILE_ROWS, 0]), row_bytes)
                _tile("tileloadd64", T.int8(7), T.address_of(right[c // TILE_ROWS + 1, k * TILE_ROWS, 0]), row_bytes)
                _tile("tdpbf16ps", T.int8(0), T.int8(4), T.int8(6))
                _tile("tdpbf16ps", T.int8(1), T.int8(4), T.int8(7))
                _tile("tdpbf16ps", T.int8(2), T.int8(5), T.int8(6))
                _tile("tdpbf16ps", T.int8(3), T.int8(5), T.int8(7))
            _tile("tilestored64", T.int8(0), T.address_of(out[r, c]), out_stride)
            _tile("tilestored64", T.int8(1), T.address_of(out[r, c + TILE_ROWS]), out_stride)
            _tile("tilestored64", T.int8(2), T.address_of(out[r + TILE_ROWS, c]), out_stride)
            _tile("tilestored64", T.int8(3), T.address_of(out[r + TILE_ROWS, c + TILE_ROWS]), out_stride)
            _tile("tilerelease")

    return kernel


class AmxLegalization:
    """relax.matmul's legalization for `--precision bf16` on an AMX target: tiles where `amx_rewritable`, else
    bf16_matmul.py's `vdpbf16ps` (or fp32) one; counts the matmuls each rewrote."""

    def __init__(self) -> None:
        self.vector = Bf16Legalization()
        self.tiled = 0

    @staticmethod
    def applies(profile: CpuProfile) -> bool:
        """Whether a target of this profile gets AMX kernels (its LLVM features include AMX tiles and bf16)."""
        return profile.amx and profile.amx_bf16

    @property
    def rewritten(self) -> int:
        """Matmuls in bf16, on tiles or vectors."""
        return self.tiled + self.vector.rewritten

    def __call__(self, bb: Any, call: Any) -> Any:
        a, b = call.args
        a_shape, b_shape = static_shape(a), static_shape(b)
        if str(call.ty.dtype) != "float32" or not amx_rewritable(a_shape, b_shape):
            return self.vector(bb, call)
        self.tiled += 1
        *lead, _ = a_shape
        rows = reduce(lambda x, y: x * y, lead, 1)
        depth, columns = b_shape
        left = bb.emit(bb.call_te(_left_te, a, primfunc_name_hint=LEFT))
        right = bb.emit(bb.call_te(_right_te, b, primfunc_name_hint=RIGHT))
        kernel = bb.add_func(amx_matmul_kernel(_padded(rows), depth, columns), KERNEL)
        out = bb.emit(relax.call_tir(kernel, [left, right],
                                     relax.TensorType((_padded(rows), columns), "float32")))
        if _padded(rows) != rows:
            out = bb.emit(relax.op.strided_slice(out, axes=[0], begin=[0], end=[rows]))
        return relax.op.reshape(out, (*lead, columns))

    def legalization_map(self) -> dict[str, Any]:
        """The entries to give relax.transform.LegalizeOps."""
        return {"relax.matmul": self}


__all__ = ["AmxLegalization", "amx_matmul_kernel", "amx_rewritable"]
