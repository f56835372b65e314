"""Copies that change the innermost axis, walked in square tiles (`TiledTranspose`, a fallback rule).

Weights are graph inputs, so the transposed weight of every linear layer is a copy that runs each call
(unless weights are transformed once), and NCHW <-> NHWC moves are copies too. In a plain loop nest one
side is read or written with a stride; square tiles keep both sides in cache lines.

Strategy:
1. Recognise a pure permuting copy whose output's innermost axis is not the input's.
2. Split both axes into tiles of one vector's width, capped at 8 (the tile's input rows then fit in as
   many cache lines), inner loops tile x tile.
3. Write output rows as vectors; parallelize the leading loops.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func

from .blocking import KernelRule, parallel_leading
from .profile import CpuProfile

MAX_TILE = 8


def transpose_tile(profile: CpuProfile) -> int:
    """Elements per side of one tile."""
    return min(profile.lanes, MAX_TILE)


def _transposed_axes(sch: Any, info: Any, tile: int) -> tuple[int, int] | None:
    """For a pure permuting copy, the loop positions of the output's and the input's innermost axes."""
    block = sch.get(info.block_rv)
    if len(block.reads) != 1 or len(block.writes) != 1 or set(info.dom_kind()) != {"S"}:
        return None
    iter_vars = [iv.var for iv in block.iter_vars]
    read, write = block.reads[0].region, block.writes[0].region
    if len(read) < 2 or not all(isinstance(r.min, tirx.Var) for r in list(read) + list(write)):
        return None
    written, source = write[-1].min, read[-1].min
    positions = [next((i for i, v in enumerate(iter_vars) if v.same_as(x)), None) for x in (written, source)]
    if None in positions or positions[0] == positions[1] or positions[0] != len(iter_vars) - 1:
        return None
    extents = [sch.get(info.iters[p].loop_rv).extent for p in positions]
    if not all(isinstance(e, tirx.IntImm) and e.value % tile == 0 for e in extents):
        return None
    return positions[0], positions[1]


class TiledTranspose(KernelRule):
    """Square tiles for copies that change the innermost axis; the output rows are written as vectors."""

    def schedule(self, sch: Any, profile: CpuProfile) -> bool:
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) != 1:
            return False
        tile = transpose_tile(profile)
        axes = _transposed_axes(sch, infos[0], tile)
        if axes is None:
            return False
        loops = [it.loop_rv for it in infos[0].iters]
        inner_out, inner_in = (loops[p] for p in axes)
        others = [loop for i, loop in enumerate(loops) if i not in axes]
        in_outer, in_tile = sch.split(inner_in, [None, tile])
        out_outer, out_tile = sch.split(inner_out, [None, tile])
        sch.reorder(*others, in_outer, out_outer, in_tile, out_tile)
        sch.vectorize(out_tile)
        parallel_leading(sch, [*others, in_outer, out_outer], "S" * (len(others) + 2))
        return True
