"""Winograd F(4x4, 3x3) for the 3x3 convolutions of an imported graph (`--conv-algorithm winograd|auto`).

In fp32 a direct convolution already runs at the machine's matmul peak, as the peers' do, so the only way
past them is less arithmetic. Winograd computes each 4x4 block of outputs from a 6x6 block of inputs
with 36 products per (input, output) channel pair instead of 144: a 4x cut in the convolution's
multiply-adds, paid for by three transforms that are cheap next to it. A rewritten convolution is:

- the weight transform U = G g G^T, [6, 6, out, in], every call: weights are graph inputs shared with
  torch (LoRA changes them in place), so nothing derived from them can be baked into the artifact;
- the input transform V = B^T d B, [6, 6, in, tiles], from the zero-padded input;
- 36 matmuls U[a, b] @ V[a, b] (`relax.matmul`, so the register-blocked matmul schedule runs them);
- the output transform Y = A^T M A, which takes the convolution's bias and residual adds as its epilogue
  (fused like a convolution: element-wise ops after it, never a reshape).

The transforms are explicit sums over topi's Cook-Toom matrices (points 0, +-1, +-2, 1/2), each done in
two passes, rows then columns.

Schedules (`WinogradTransformRule`; the 36 matmuls are the matmul rule's), vectors of the target's lanes:
1. Weight transform: per output channel (in parallel), the 36 transformed values of one vector of input
   channels at a time, from their nine taps copied transposed into registers first (read in place, each
   tap would be a stride-9 gather).
2. Input transform: per channel and row of tiles (in parallel), the row pass over the six input rows those
   tiles read, then the column pass with one vector of the row's tiles as lanes.
3. Output transform with the convolution's epilogue: per image, output channel and row of tiles (in
   parallel), the column pass as vectors over the row's tiles, then the row pass and the epilogue,
   writing each output row's tiles as vector lanes (stride 4).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from ..relax_shapes import static_shape
from .blocking import KernelRule, block_names, inline_around, largest_tile, static_extents
from .profile import CpuProfile

TILE = 4
KERNEL = 3
ALPHA = TILE + KERNEL - 1
WEIGHT = "winograd_weight"
INPUT_ROWS = "winograd_input_rows"
INPUT = "winograd_input"
OUTPUT_COLUMNS = "winograd_output_columns"
OUTPUT = "winograd_output"
AUTO_MIN_TILES = 32
ROW_PADDING = 16
OPAQUE, OUTPUT_FUSABLE = 8, 4

Matrix = tuple[tuple[float, ...], ...]


@cache
def _transposed_matrices() -> tuple[Matrix, Matrix, Matrix]:
    """(A^T, B^T, G) of F(4x4, 3x3): 4x6, 6x6, 6x3, rows indexed by the loop variable of each sum."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

    a, b, g = _cook_toom_convolution(_interpolation_points(ALPHA), TILE, KERNEL)
    return tuple(tuple(tuple(float(v) for v in row) for row in m) for m in (a.T, b.T, g))


def _entry(matrix: Matrix, row: Any, column: int, dtype: str) -> Any:
    """matrix[row][column] for a loop variable `row`: a select chain that an unrolled loop folds to a constant."""
    from tvm import tirx

    value = tirx.const(0.0, dtype)
    for r, entries in enumerate(matrix):
        if entries[column] != 0.0:
            value = tirx.Select(row == r, tirx.const(entries[column], dtype), value)
    return value


def _dot(terms: list[tuple[Any, Any]]) -> Any:
    total = terms[0][0] * terms[0][1]
    for coefficient, value in terms[1:]:
        total = total + coefficient * value
    return total


def _weight_te(weight: Any) -> Any:
    """U[a, b, o, i] = sum over k, m of G[a, k] g[o, i, k, m] G[b, m]."""
    from tvm import te

    g = _transposed_matrices()[2]
    dtype = weight.dtype
    return te.compute(
        (ALPHA, ALPHA, weight.shape[0], weight.shape[1]),
        lambda a, b, o, i: _dot([(_entry(g, a, k, dtype) * _entry(g, b, m, dtype), weight[o, i, k, m])
                                 for k in range(KERNEL) for m in range(KERNEL)]),
        name=WEIGHT)


def _input_te(data: Any) -> Any:
    """V[a, b, c, p] = (B^T d B)[a, b] for the 6x6 input patch d of channel c at tile p (image, row, column)."""
    from tvm import te, tirx

    b_t = _transposed_matrices()[1]
    batch, channels, height, width = (int(x) for x in data.shape)
    rows, columns = height // TILE, width // TILE
    dtype = data.dtype

    def padded(n: Any, c: Any, y: Any, x: Any) -> Any:
        inside = tirx.all(y >= 1, y <= height, x >= 1, x <= width)
        return tirx.if_then_else(inside, data[n, c, y - 1, x - 1], tirx.const(0.0, dtype))

    row_pass = te.compute(
        (batch, channels, rows, ALPHA, -(-(width + 2) // ROW_PADDING) * ROW_PADDING),
        lambda n, c, t, a, x: _dot([(_entry(b_t, a, i, dtype), padded(n, c, t * TILE + i, x)) for i in range(ALPHA)]),
        name=INPUT_ROWS)

    def column_pass(a: Any, b: Any, c: Any, p: Any) -> Any:
        n, t, u = p // (rows * columns), p // columns % rows, p % columns
        return _dot([(_entry(b_t, b, j, dtype), row_pass[n, c, t, a, u * TILE + j]) for j in range(ALPHA)])

    return te.compute((ALPHA, ALPHA, channels, batch * rows * columns), column_pass, name=INPUT)


def _output_te(products: Any, batch: int, height: int, width: int) -> Any:
    """Y[n, o, y, x] = (A^T M A)[y % 4, x % 4] for the 6x6 products M of output channel o at y's and x's tile."""
    from tvm import te

    a_t = _transposed_matrices()[0]
    channels = int(products.shape[2])
    rows, columns = height // TILE, width // TILE
    dtype = products.dtype
    column_pass = te.compute(
        (ALPHA, TILE, channels, batch * rows * columns),
        lambda a, c, o, p: _dot([(_entry(a_t, c, b, dtype), products[a, b, o, p]) for b in range(ALPHA)]),
        name=OUTPUT_COLUMNS)

    def row_pass(n: Any, o: Any, y: Any, x: Any) -> Any:
        p = (n * rows + y // TILE) * columns + x // TILE
        return _dot([(_entry(a_t, y % TILE, a, dtype), column_pass[a, x % TILE, o, p]) for a in range(ALPHA)])

    return te.compute((batch, channels, height, width), row_pass, name=OUTPUT)


def winograd_applies(call: Any, min_tiles: int) -> bool:
    """Whether a `relax.nn.conv2d` call is a 3x3, stride-1, 'same'-padded NCHW convolution with whole 4x4
    tiles, at least `min_tiles` of them and a multiple of 8 (the matmul schedule's narrowest vector)."""
    attrs = call.attrs
    data, weight = static_shape(call.args[0]), static_shape(call.args[1])
    if data is None or weight is None or len(data) != 4 or weight[2:] != [KERNEL, KERNEL]:
        return False
    plain = ([int(x) for x in attrs.strides] == [1, 1] and [int(x) for x in attrs.dilation] == [1, 1]
             and [int(x) for x in attrs.padding] == [1, 1, 1, 1] and int(attrs.groups) == 1
             and (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == ("NCHW", "OIHW", "NCHW"))
    batch, _, height, width = data
    tiles = batch * (height // TILE) * (width // TILE)
    return plain and height % TILE == 0 and width % TILE == 0 and tiles % 8 == 0 and tiles >= min_tiles


def use_winograd(mod: Any, algorithm: str, weights_transformed_once: bool = False) -> tuple[Any, int]:
    """Rewrite the graph's 3x3 convolutions to Winograd: all that fit its tiles (`winograd`), those where it
    saves time (`auto`), or none (`direct`). Returns the module and how many convolutions were rewritten.

    `auto` weighs the weight transform: computed on every call, it costs more than Winograd saves below
    AUTO_MIN_TILES tiles (SD1.5's 1280-channel convolutions at 8x8 lose, at 16x16 they gain; the timings
    are in benchmarks/HISTORY.md). Computed once per
    weight change (`weights_transformed_once`), it costs nothing per call and every fitting convolution
    gains.
    """
    from tvm import relax
    from tvm.relax import expr_functor

    if algorithm == "direct":
        return mod, 0
    min_tiles = 1 if algorithm == "winograd" or weights_transformed_once else AUTO_MIN_TILES

    @expr_functor.mutator
    class WinogradRewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") != "relax.nn.conv2d" or not winograd_applies(call, min_tiles):
                return call
            batch, _, height, width = static_shape(call.args[0])
            self.rewritten += 1
            bb = self.builder_
            weights = bb.emit(bb.call_te(_weight_te, call.args[1], primfunc_name_hint=WEIGHT,
                                         primfunc_attrs={"op_pattern": OPAQUE}))
            patches = bb.emit(bb.call_te(_input_te, call.args[0], primfunc_name_hint=INPUT,
                                         primfunc_attrs={"op_pattern": OPAQUE}))
            products = bb.emit(relax.op.matmul(weights, patches))
            return bb.call_te(_output_te, products, batch, height, width, primfunc_name_hint=OUTPUT,
                              primfunc_attrs={"op_pattern": OUTPUT_FUSABLE})

    rewriter = WinogradRewriter(mod)
    rewriter.rewritten = 0
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get()), rewriter.rewritten


def _schedule_weight(sch: Any, profile: CpuProfile) -> bool:
    if block_names(sch) != [WEIGHT]:
        return False
    block = sch.get_sblock(WEIGHT)
    a, b, out, inner = sch.get_loops(block)
    extents = static_extents(sch, [inner])
    if extents is None:
        return False
    inner_outer, inner_lanes = sch.split(inner, [None, largest_tile(extents[0], profile.lanes)])
    sch.reorder(out, inner_outer, a, b, inner_lanes)
    sch.parallel(out)
    taps = sch.cache_read(block, 0, "local")
    sch.compute_at(taps, inner_outer)
    sch.transform_layout(block, ("read", 0), lambda o, i, k, m: (o, k, m, i))
    sch.unroll(a)
    sch.unroll(b)
    sch.vectorize(inner_lanes)
    return True


def _schedule_input(sch: Any, profile: CpuProfile) -> bool:
    if block_names(sch) != [INPUT_ROWS, INPUT]:
        return False
    rows, block = sch.get_sblock(INPUT_ROWS), sch.get_sblock(INPUT)
    a, b, channel, tile = sch.get_loops(block)
    extents = static_extents(sch, [*sch.get_loops(rows)[:3], tile])
    if extents is None:
        return False
    images, _, tile_rows, tiles = extents
    tiles_per_row = tiles // (images * tile_rows)
    tile_row, tile_column = sch.split(tile, [None, tiles_per_row])
    column_outer, column_lanes = sch.split(tile_column, [None, largest_tile(tiles_per_row, profile.lanes)])
    sch.reorder(channel, tile_row, column_outer, a, b, column_lanes)
    task = sch.fuse(channel, tile_row)
    sch.parallel(task)
    sch.unroll(a)
    sch.unroll(b)
    sch.vectorize(column_lanes)
    sch.compute_at(rows, task)
    row_a, column = sch.get_loops(rows)[-2:]
    sch.unroll(row_a)
    sch.vectorize(sch.split(column, [None, largest_tile(ROW_PADDING, profile.lanes)])[1])
    return True


def _schedule_output(sch: Any, profile: CpuProfile) -> bool:
    names = block_names(sch)
    if OUTPUT_COLUMNS not in names or OUTPUT not in names:
        return False
    found = inline_around(sch, OUTPUT_COLUMNS, "SSSS")
    if found is None:
        return False
    columns, output = found
    loops = sch.get_loops(output)
    if len(loops) != 4:
        return False
    batch, channel, y, x = loops
    tile_row, row = sch.split(y, [None, TILE])
    tile_column, column = sch.split(x, [None, TILE])
    extent = static_extents(sch, [tile_column])
    if extent is None:
        return False
    column_outer, column_lanes = sch.split(tile_column, [None, largest_tile(extent[0], profile.lanes)])
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
    sch.vectorize(sch.split(tile, [None, largest_tile(static_extents(sch, [tile])[0], profile.lanes)])[1])
    return True


class WinogradTransformRule(KernelRule):
    """The weight, input and output transforms of a Winograd convolution, each found by its block names."""

    def schedule(self, sch: Any, profile: CpuProfile) -> bool:
        return any(step(sch, profile) for step in (_schedule_weight, _schedule_input, _schedule_output))
