"""(Batched) matmuls with their element-wise epilogue, register-blocked (`MatmulRule`).

Linear layers, the attention projections and Winograd's 36 products all end up here.

Strategy:
1. Inline the element-wise blocks around the matmul except the output (its epilogue); a matmul with a
   producer left (a transpose that would not inline) is declined.
2. Register block: rows x columns, the columns as one or two vectors (a power of two: 40- or 80-wide
   vectors are far slower), rows unrolled, at most half the register file in accumulators. Among the
   shapes that divide the matrix, the one with the most accumulators wins, wider on a tie (77 text tokens:
   7 rows x 32 columns on AVX-512, 7 x 8 on AVX2).
3. Row chunks: the rows are cut into chunks whose slice of the left-hand matrix fits in half of L2, so it
   is read from memory once and from L2 for every column panel (without chunks the whole left-hand matrix
   streamed from memory once per panel). A chunk holds at least 128 rows even where that overflows L2:
   each chunk packs the panels again (step 4), so small chunks pay the packing too often. The chunks,
   times the column panels, are the parallel loop.
4. Packed panels: for each (chunk, column panel) the right-hand matrix's panel is copied into a contiguous
   reduction x columns buffer first. Read in place, a panel's rows lie one matrix row apart; at 5,120 or
   10,240 columns that is a multiple of 4 KiB and every row falls in the same L1 set. Packed, the panel
   is contiguous (benchmarks/kernel_speed.py times the kernel).
"""

from __future__ import annotations

from typing import Any

from tvm import tirx

from .blocking import KernelRule, inline_around, largest_tile, static_extents
from .profile import CpuProfile

BLOCK_NAME = "matmul"
MAX_ROWS = 8
NARROWEST = 8
MOST_CHUNK_ROWS = 256
FEWEST_CHUNK_ROWS = 128


def matmul_tiles(rows: int, columns: int, profile: CpuProfile) -> tuple[int, int] | None:
    """(rows, columns) of one register block, or None where the columns are no multiple of NARROWEST."""
    best = None
    for vectors in (2, 1):
        width = largest_tile(columns, vectors * profile.lanes)
        if width < NARROWEST:
            continue
        most = min(MAX_ROWS, profile.accumulators // max(1, width // profile.lanes))
        height = next(r for r in range(most, 0, -1) if rows % r == 0)
        score = height * max(1, width // profile.lanes)
        if best is None or score > best[0]:
            best = (score, height, width)
    return None if best is None else (best[1], best[2])


def register_blocks_per_chunk(rows: int, reduction: int, block_rows: int, profile: CpuProfile) -> int:
    """How many register blocks of rows make one row chunk: its slice of the left-hand matrix (rows x
    reduction floats) fits in half of L2, it holds FEWEST..MOST_CHUNK_ROWS rows where the matrix allows,
    and the chunks divide the rows exactly."""
    fits = max(FEWEST_CHUNK_ROWS, min(MOST_CHUNK_ROWS, profile.l2_bytes // 2 // (4 * reduction)))
    blocks = rows // block_rows
    return next(b for b in range(max(1, fits // block_rows), 0, -1) if blocks % b == 0)


def find_matmul(sch: Any, name_prefix: str) -> tuple[Any, Any] | None:
    """Step 1 for a matmul block named `name_prefix`* with up to two batch dimensions: (matmul block, output
    block) with everything else element-wise inlined, or None when the function holds no such matmul."""
    for batch_dims in (0, 1, 2):
        found = inline_around(sch, name_prefix, "S" * (batch_dims + 2) + "R")
        if found is not None:
            return found
    return None


class MatmulRule(KernelRule):
    """A function holding one (batched) matmul and its element-wise epilogue."""

    def schedule(self, sch: Any, profile: CpuProfile) -> bool:
        found = find_matmul(sch, BLOCK_NAME)
        if found is None:
            return False
        matmul, output = found
        if sch.get_producers(matmul):
            return False
        right = right_hand_read(sch, matmul)
        *batch, row, column, reduction = sch.get_loops(matmul)
        extents = static_extents(sch, [row, column, reduction])
        tiles = matmul_tiles(*extents[:2], profile) if extents and right is not None else None
        if tiles is None:
            return False
        panel_blocked(sch, matmul, output, batch, row, column, [reduction], right, tiles, profile)
        return True


def panel_blocked(sch: Any, block: Any, output: Any, batch: list[Any], row: Any, column: Any,
                  reduction: list[Any], right: int, tiles: tuple[int, int], profile: CpuProfile) -> None:
    """Steps 3-4 and the register block of step 2 for a matmul-shaped block (1x1 convolutions too): row
    chunks x packed column panels in parallel, register blocks of `tiles` within. `right` is the index among
    the block's reads of the matrix whose panels are packed; every loop extent must be constant."""
    panel, row_inner, column_inner = panel_blocked_loops(sch, block, output, batch, row, column, reduction, right,
                                                         tiles, profile)
    sch.vectorize(sch.get_loops(panel)[-1])
    sch.unroll(row_inner)
    sch.vectorize(column_inner)
    sch.decompose_reduction(block, reduction[0])


def panel_blocked_loops(sch: Any, block: Any, output: Any, batch: list[Any], row: Any, column: Any,
                        reduction: list[Any], right: int, tiles: tuple[int, int],
                        profile: CpuProfile) -> tuple[Any, Any, Any]:
    """The loops of `panel_blocked` with the accumulators and the epilogue in place, before the register
    block's own loops get their unrolling and vectors: returns (panel packing block, register block's rows
    loop, its columns loop), for a caller that computes the register block its own way."""
    rows, depth = static_extents(sch, [row, reduction[0]])
    blocks = register_blocks_per_chunk(rows, depth, tiles[0], profile)
    chunk, row_outer, row_inner = sch.split(row, [None, blocks, tiles[0]])
    column_outer, column_inner = sch.split(column, [None, tiles[1]])
    sch.reorder(*batch, chunk, column_outer, row_outer, *reduction, row_inner, column_inner)
    panel = sch.cache_read(block, right, "global")
    sch.compute_at(panel, column_outer)
    accumulators = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulators, row_outer)
    written = [accumulators]
    if sch.get(output).name_hint != sch.get(block).name_hint:
        sch.reverse_compute_at(output, row_outer)
        written.append(output)
    sch.parallel(sch.fuse(*batch, chunk, column_outer))
    for result in written:
        result_rows, result_columns = sch.get_loops(result)[-2:]
        sch.unroll(result_rows)
        sch.vectorize(result_columns)
    return panel, row_inner, column_inner


def right_hand_read(sch: Any, block: Any, positions: tuple[int, int, int] = (-3, -2, -1)) -> int | None:
    """The index, among the block's reads, of the right-hand matrix: the one read indexed by the column and
    reduction iterators and not by the row's (`row`, `column`, `reduction`: positions among the iterators,
    a matmul's last three by default)."""
    stmt = sch.get(block)
    variables = [v.var for v in stmt.iter_vars]
    row, column, reduction = (variables[p] for p in positions)
    for index, region in enumerate(stmt.reads):
        used = [var for dim in region.region for var in tirx.analysis.undefined_vars(dim.min)]
        if _holds(used, column) and _holds(used, reduction) and not _holds(used, row):
            return index
    return None


def _holds(variables: list[Any], var: Any) -> bool:
    return any(v.same_as(var) for v in variables)
