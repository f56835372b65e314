"""Default CPU schedules for kernels that have no tuning record.

Without a schedule every TIR kernel is a naive single-threaded loop nest (the text encoder ran at
0.9 GFLOP/s that way). DLight's CPU rules (GEMV, row reductions) made the tiny UNet 25 % slower
single-threaded here, so they are not used. Three rules instead:

- `RegisterBlocked`, for a fused NCHW convolution (padding, conv, bias/residual/timestep adds) or a fused
  (batched) matmul: a block of output channels (matmul: rows) x output columns accumulated in registers
  over the whole reduction, the columns as vectors, the epilogue applied as each block is written.
  Convolutions run rows and channel blocks in parallel (wide images row by row, so that the input rows a
  block reads stay in cache for every channel block); matmuls run column panels in parallel, each panel
  of the right-hand matrix staying in cache while every row block passes it. No layout change, so
  weights stay the caller's tensors. On the full-size SD1.5 UNet's kernels it runs at 170-220 GFLOP/s on
  2 cores, as fast as torch's oneDNN convolutions and faster than its matmuls; MetaSchedule's random
  samples of the same convolutions ran at 23-95 GFLOP/s. The same rule schedules attention.py's fused
  attention and winograd.py's three transforms (by their block names), whose 36 matmuls are plain
  batched matmuls here.
- `TiledTranspose`: a copy whose innermost output axis is not the input's innermost axis (the transposed
  weight of every linear layer, since weights are graph inputs; NCHW <-> NHWC moves) reads memory with a
  stride in a plain loop nest. Walking it in 8x8 tiles keeps both sides in cache lines: a 3072x768 weight
  transpose runs 4.8x faster here (18.4 GB/s against 3.8 GB/s).
- `ParallelFallback`, for every other kernel: enough leading spatial loops of each loop nest to give every
  core several chunks run in parallel; the loop order and the innermost loop, which LLVM vectorizes, stay.
"""

from __future__ import annotations

from typing import Any

from . import attention, winograd

PARALLEL_CHUNKS = 64
TRANSPOSE_TILE = 8
CONV_ITERS = "SSSSRRR"
CONV_ROWS_FIRST_WIDTH = 128


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


def convolution_tiles(out_channels: int, width: int, window: int) -> tuple[int, int]:
    """(output channels, output columns) of one register block, for a kernel window of `window` taps.

    Measured on the SD1.5 UNet's and VAE's convolutions (2 cores, AVX-512): 3x3 windows run fastest with
    4 channels x 32 columns or 8 x 16 (8 vector accumulators, each input vector reused 9 times); a 1x1
    window reads a new input vector per multiply-add row, so it needs more channels per vector: 16 x 16.
    """
    columns = _largest_tile(width, 32 if window > 1 else 16)
    wanted = 16 if window == 1 else 4 if columns >= 32 else 8
    return _largest_tile(out_channels, wanted), columns


def matmul_tiles(rows: int, columns: int) -> tuple[int, int] | None:
    """(rows, columns) of one matmul register block, or None where the columns are no multiple of 8.

    Columns must be a power of two: 40- or 80-wide vectors ran at 10 GFLOP/s here. Any row count up to 8
    works (77 text tokens: 7 rows per block).
    """
    width = _largest_tile(columns, 32)
    if width < 8:
        return None
    return next(r for r in range(8, 0, -1) if rows % r == 0), width


def _largest_tile(extent: int, most: int) -> int:
    """The largest power of two up to `most` that divides `extent`."""
    tile = most
    while extent % tile:
        tile //= 2
    return tile


def _static_extents(sch: Any, loops: list[Any]) -> list[int] | None:
    from tvm import tirx

    extents = [sch.get(loop).extent for loop in loops]
    return [e.value for e in extents] if all(isinstance(e, tirx.IntImm) for e in extents) else None


def _inline_around(sch: Any, name_prefix: str, iter_kinds: str) -> tuple[Any, Any] | None:
    """Find the one block named `name_prefix`* with these iterator kinds and inline every element-wise block
    around it except its direct producers (padding) and the function's output (its epilogue).

    Returns (block, output block), or None when the function is not shaped that way."""
    from tvm.s_tir import ScheduleError
    from tvm.s_tir.dlight.analysis import get_sblock_info

    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    found = [b for b in blocks if sch.get(b).name_hint.startswith(name_prefix)
             and "".join(get_sblock_info(sch, b).dom_kind()) == iter_kinds]
    outputs = sch.get_output_blocks(root)
    if len(found) != 1 or len(outputs) != 1:
        return None
    block, output = found[0], outputs[0]
    keep = {sch.get(b).name_hint for b in (block, output, *sch.get_producers(block))}
    try:
        for other in blocks:
            if sch.get(other).name_hint not in keep:
                sch.compute_inline(other)
    except ScheduleError:
        return None
    return block, output


def _accumulate_in_registers(sch: Any, block: Any, output: Any, parallel: list[Any], at: Any,
                             reduction: list[Any], rows: Any, columns: Any) -> None:
    """Loop order parallel, at, reduction, rows, columns; the rows x columns block of results lives in
    registers (a local buffer, rows unrolled, columns as vectors) for the whole reduction and is written,
    through the epilogue, once per block. With no `parallel` loops, `at` must sit under one outer loop."""
    sch.reorder(*parallel, at, *reduction, rows, columns)
    accumulators = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulators, at)
    written = [accumulators]
    if sch.get(output).name_hint != sch.get(block).name_hint:
        sch.reverse_compute_at(output, at)
        written.append(output)
    if parallel:
        sch.parallel(sch.fuse(*parallel) if len(parallel) > 1 else parallel[0])
    sch.unroll(rows)
    sch.vectorize(columns)
    sch.decompose_reduction(block, reduction[0])
    for result in written:
        *outer, inner = sch.get_loops(result)[2:]
        sch.vectorize(inner)
        for loop in outer:
            sch.unroll(loop)


def _schedule_convolution(sch: Any) -> bool:
    """Schedule a function holding one NCHW convolution and element-wise blocks around it; False if it is not."""
    found = _inline_around(sch, "conv2d_nchw", CONV_ITERS)
    if found is None:
        return False
    conv, output = found
    batch, channel, row, column, *reduction = sch.get_loops(conv)
    extents = _static_extents(sch, [channel, column, *reduction])
    if extents is None:
        return False
    channels, columns = convolution_tiles(extents[0], extents[1], extents[3] * extents[4])
    channel_outer, channel_inner = sch.split(channel, [None, channels])
    column_outer, column_inner = sch.split(column, [None, columns])
    rows_first = extents[1] >= CONV_ROWS_FIRST_WIDTH
    parallel = [batch, row, channel_outer] if rows_first else [batch, channel_outer, row]
    padding = sch.get_producers(conv)
    _accumulate_in_registers(sch, conv, output, parallel, column_outer, reduction, channel_inner, column_inner)
    for block in padding:
        loops = sch.get_loops(block)
        _parallel_leading(sch, loops[:-1], "S" * (len(loops) - 1))
    return True


def _schedule_matmul(sch: Any) -> bool:
    """Schedule a function holding one (batched) matmul and its element-wise epilogue; False if it is not."""
    for batch_dims in (0, 1, 2):
        found = _inline_around(sch, "matmul", "S" * (batch_dims + 2) + "R")
        if found is not None:
            break
    else:
        return False
    matmul, output = found
    if sch.get_producers(matmul):
        return False
    *batch, row, column, reduction = sch.get_loops(matmul)
    extents = _static_extents(sch, [row, column])
    tiles = matmul_tiles(*extents) if extents else None
    if tiles is None:
        return False
    row_outer, row_inner = sch.split(row, [None, tiles[0]])
    column_outer, column_inner = sch.split(column, [None, tiles[1]])
    _accumulate_in_registers(sch, matmul, output, [*batch, column_outer], row_outer, [reduction], row_inner,
                             column_inner)
    return True


def _block_names(sch: Any) -> list[str]:
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]


def _schedule_attention(sch: Any) -> bool:
    """Schedule attention.py's fused attention: per block of 32 query rows (in parallel), the transposed
    scores (16 keys x 32 queries in registers), the softmax statistics and the weighted values (8 value
    columns x 32 queries), all on a block-sized slice of the score matrix that stays in cache."""
    names = _block_names(sch)
    if attention.SCORES not in names or names[-1] != attention.OUTPUT:
        return False
    output = sch.get_sblock(attention.OUTPUT)
    *lead, row, column = sch.get_loops(output)
    scores = sch.get_sblock(attention.SCORES)
    extents = _static_extents(sch, [row, column, sch.get_loops(scores)[-3]])
    if extents is None or extents[0] % 16:
        return False
    rows, column_tile, key_tile = _largest_tile(extents[0], 32), _largest_tile(extents[1], 8), \
        _largest_tile(extents[2], 16)
    row_outer, row_inner = sch.split(row, [None, rows])
    sch.reorder(*lead, row_outer, column, row_inner)
    query_block = sch.fuse(*lead, row_outer)
    sch.parallel(query_block)
    for name in reversed(names[:-1]):
        sch.compute_at(sch.get_sblock(name), query_block)
    products = {attention.SCORES: key_tile, "attention_weighted": column_tile}
    statistics = ("attention_max", "attention_sum")
    for name, tile in products.items():
        block = sch.get_sblock(name)
        outer_axis, query, reduction = sch.get_loops(block)[1:]
        outer, inner = sch.split(outer_axis, [None, tile])
        _accumulate_in_registers(sch, block, block, [], outer, [reduction], inner, query)
    for name in statistics:
        block = sch.get_sblock(name)
        query, keys = sch.get_loops(block)[1:]
        sch.reorder(keys, query)
        sch.vectorize(query)
        sch.decompose_reduction(block, keys)
    for name in names:
        if name not in products and name not in statistics:
            sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])
    return True


def _schedule_winograd_weight(sch: Any) -> bool:
    """winograd.py's weight transform: per output channel (in parallel), the 36 transformed values of 16
    input channels at a time, as vectors, from their nine taps copied transposed into registers first
    (read in place, each tap is a stride-9 gather: 53 ms against 22 ms for SD1.5's 1280x1280 weights)."""
    if _block_names(sch) != [winograd.WEIGHT]:
        return False
    block = sch.get_sblock(winograd.WEIGHT)
    a, b, out, inner = sch.get_loops(block)
    extents = _static_extents(sch, [inner])
    if extents is None:
        return False
    inner_outer, inner_lanes = sch.split(inner, [None, _largest_tile(extents[0], 16)])
    sch.reorder(out, inner_outer, a, b, inner_lanes)
    sch.parallel(out)
    taps = sch.cache_read(block, 0, "local")
    sch.compute_at(taps, inner_outer)
    sch.transform_layout(block, ("read", 0), lambda o, i, k, m: (o, k, m, i))
    sch.unroll(a)
    sch.unroll(b)
    sch.vectorize(inner_lanes)
    return True


def _schedule_winograd_input(sch: Any) -> bool:
    """winograd.py's input transform: per channel and row of tiles (in parallel), the row pass over the six
    input rows those tiles read, then the column pass with 16 tiles of the row as vector lanes."""
    if _block_names(sch) != [winograd.INPUT_ROWS, winograd.INPUT]:
        return False
    rows, block = sch.get_sblock(winograd.INPUT_ROWS), sch.get_sblock(winograd.INPUT)
    a, b, channel, tile = sch.get_loops(block)
    extents = _static_extents(sch, [*sch.get_loops(rows)[:3], tile])
    if extents is None:
        return False
    images, _, tile_rows, tiles = extents
    tiles_per_row = tiles // (images * tile_rows)
    tile_row, tile_column = sch.split(tile, [None, tiles_per_row])
    column_outer, column_lanes = sch.split(tile_column, [None, _largest_tile(tiles_per_row, winograd.LANES)])
    sch.reorder(channel, tile_row, column_outer, a, b, column_lanes)
    task = sch.fuse(channel, tile_row)
    sch.parallel(task)
    sch.unroll(a)
    sch.unroll(b)
    sch.vectorize(column_lanes)
    sch.compute_at(rows, task)
    row_a, column = sch.get_loops(rows)[-2:]
    sch.unroll(row_a)
    sch.vectorize(sch.split(column, [None, winograd.LANES])[1])
    return True


def _schedule_winograd_output(sch: Any) -> bool:
    """winograd.py's output transform with the convolution's epilogue: per image, output channel and row of
    tiles (in parallel), the column pass as vectors over the row's tiles, then the row pass and the
    epilogue, writing each output row's tiles as vector lanes (stride 4)."""
    names = _block_names(sch)
    if winograd.OUTPUT_COLUMNS not in names or winograd.OUTPUT not in names:
        return False
    found = _inline_around(sch, winograd.OUTPUT_COLUMNS, "SSSS")
    if found is None:
        return False
    columns, output = found
    loops = sch.get_loops(output)
    if len(loops) != 4:
        return False
    batch, channel, y, x = loops
    tile_row, row = sch.split(y, [None, winograd.TILE])
    tile_column, column = sch.split(x, [None, winograd.TILE])
    extent = _static_extents(sch, [tile_column])
    if extent is None:
        return False
    column_outer, column_lanes = sch.split(tile_column, [None, _largest_tile(extent[0], winograd.LANES)])
    sch.reorder(batch, channel, tile_row, column_outer, row, column, column_lanes)
    task = sch.fuse(batch, channel, tile_row)
    sch.parallel(task)
    sch.unroll(row)
    sch.unroll(column)
    sch.vectorize(column_lanes)
    sch.compute_at(columns, task)
    a, c, tile = sch.get_loops(columns)[-3:]
    sch.unroll(a)
    sch.unroll(c)
    sch.vectorize(sch.split(tile, [None, _largest_tile(_static_extents(sch, [tile])[0], winograd.LANES)])[1])
    return True


def _rules() -> list[Any]:
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class RegisterBlocked(CPUScheduleRule):
        """Register-blocked, vectorized attentions, convolutions and matmuls with their element-wise epilogues."""

        def apply(self, func: Any, target: Any, _: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            for schedule in (_schedule_attention, _schedule_convolution, _schedule_matmul, _schedule_winograd_weight,
                             _schedule_winograd_input, _schedule_winograd_output):
                sch = s_tir.Schedule(func)
                if schedule(sch):
                    return sch
            return None

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

    return [RegisterBlocked(), dlight.cpu.Reduction(), TiledTranspose(), ParallelFallback()]


def apply_register_blocked_schedules(mod: Any, target: Any) -> Any:
    """Schedule every convolution and matmul kernel of a CPU module; they are then left out of tuning."""
    from tvm.s_tir import dlight

    with target:
        return dlight.ApplyDefaultSchedule(_rules()[0])(mod)


def apply_default_cpu_schedules(mod: Any, target: Any) -> Any:
    """Give every kernel still without a schedule (after apply_register_blocked_schedules and tuning records) a
    default one: row reduction, tiled transpose or parallel loops."""
    from tvm.s_tir import dlight

    with target:
        return dlight.ApplyDefaultSchedule(*_rules()[1:])(mod)
