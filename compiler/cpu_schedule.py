"""Default CPU schedules for kernels that have no tuning record.

Without a schedule every TIR kernel is a naive single-threaded loop nest (the text encoder ran at
0.9 GFLOP/s that way). DLight's CPU rules (GEMV, row reductions) made the tiny UNet 25 % slower
single-threaded here, so they are not used. Two rules instead:

- `TiledTranspose`: a copy whose innermost output axis is not the input's innermost axis (the transposed
  weight of every linear layer, since weights are graph inputs; NCHW <-> NHWC moves) reads memory with a
  stride in a plain loop nest. Walking it in 8x8 tiles keeps both sides in cache lines: a 3072x768 weight
  transpose runs 4.8x faster here (18.4 GB/s against 3.8 GB/s).
- `ParallelFallback`, for every other kernel: enough leading spatial loops of each loop nest to give every
  core several chunks run in parallel; the loop order and the innermost loop, which LLVM vectorizes, stay.
"""

from __future__ import annotations

from typing import Any

PARALLEL_CHUNKS = 64
TRANSPOSE_TILE = 8


def _parallel_leading(sch: Any, loops: list[Any], kinds: str) -> None:
    """Fuse and parallelize the leading spatial loops until every core has several chunks."""
    from tvm import tirx

    outer, chunks = [], 1
    for loop, kind in zip(loops, kinds, strict=True):
        extent = sch.get(loop).extent
        if kind != "S" or not isinstance(extent, tirx.IntImm) or chunks >= PARALLEL_CHUNKS:
            break
        outer.append(loop)
        chunks *= extent.value
    if chunks > 1:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _transposed_axes(sch: Any, info: Any) -> tuple[int, int] | None:
    """For a pure permuting copy, the loop positions of the output's and the input's innermost axes."""
    from tvm import tirx

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
    if not all(isinstance(e, tirx.IntImm) and e.value % TRANSPOSE_TILE == 0 for e in extents):
        return None
    return positions[0], positions[1]


def _rules() -> list[Any]:
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class TiledTranspose(CPUScheduleRule):
        """8x8 tiles for copies that change the innermost axis; the output rows are written as vectors."""

        def apply(self, func: Any, target: Any, _: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None or len(infos) != 1:
                return None
            axes = _transposed_axes(sch, infos[0])
            if axes is None:
                return None
            loops = [it.loop_rv for it in infos[0].iters]
            inner_out, inner_in = (loops[p] for p in axes)
            others = [loop for i, loop in enumerate(loops) if i not in axes]
            in_outer, in_tile = sch.split(inner_in, [None, TRANSPOSE_TILE])
            out_outer, out_tile = sch.split(inner_out, [None, TRANSPOSE_TILE])
            sch.reorder(*others, in_outer, out_outer, in_tile, out_tile)
            sch.vectorize(out_tile)
            _parallel_leading(sch, [*others, in_outer, out_outer], "S" * (len(others) + 2))
            return sch

    class ParallelFallback(CPUScheduleRule):
        """Parallel leading spatial loops for any CPU kernel."""

        def apply(self, func: Any, target: Any, _: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            for info in infos:
                loops = sch.get_loops(info.block_rv)
                kinds = info.dom_kind()
                if len(loops) < 2 or len(loops) != len(kinds):
                    continue
                _parallel_leading(sch, loops[:-1], kinds[:-1])
            return sch

    return [TiledTranspose(), ParallelFallback()]


def apply_default_cpu_schedules(mod: Any, target: Any) -> Any:
    """Give every still-unscheduled kernel of a CPU module a default schedule (tiled transpose or parallel)."""
    from tvm.s_tir import dlight

    with target:
        return dlight.ApplyDefaultSchedule(*_rules())(mod)
