"""Attention: each matmul -> softmax -> matmul of an imported graph as one kernel, and its schedule.

The ONNX export spells attention as three ops, so a plain build writes every score matrix to memory and
reads it back twice: at 4096 tokens (SD1.5's 64x64 latent) that is 1 GiB per pass. The fused kernel
computes a block of query rows' scores, their softmax and their share of the output while the block is
still in cache, as torch's scaled_dot_product_attention does.

Schedule (`AttentionRule`), sized by the target's CpuProfile:
1. Query blocks: the queries split into blocks of two vectors (32 queries on AVX-512, 16 on AVX2), run in
   parallel; every intermediate is computed at the block, so its slice of the score matrix (keys x block
   queries: 512 KiB at 4096 keys on AVX-512) stays in L2.
2. Scores: transposed (keys x queries), a register block of keys x the block's query vectors, accumulated
   over the head depth; at most `accumulators` vectors, so the block leaves registers for the operands
   and does not spill.
3. Softmax statistics (max, sum) per query, reduced over keys with the queries as vector lanes; the
   max-shifted scores are not stored but recomputed inside the exponential (one pass over the score
   slice fewer).
4. Weighted values: a register block of value columns x the block's query vectors (as many columns as
   the accumulators allow, any divisor of the head width, not only powers of two), then the output
   written row by row, divided by the sums.
"""

from __future__ import annotations

from typing import Any

from ..relax_shapes import static_shape
from .blocking import (
    KernelRule,
    accumulate_in_registers,
    block_names,
    largest_divisor,
    largest_tile,
    static_extents,
)
from .profile import CpuProfile

SCORES = "attention_scores"
SHIFTED = "attention_shifted"
MAX = "attention_max"
SUM = "attention_sum"
WEIGHTED = "attention_weighted"
OUTPUT = "attention_output"
NAME = "fused_attention"
QUERY_MULTIPLE = 16


def _attention_te(q: Any, key_t: Any, value: Any) -> Any:
    """softmax(q @ key_t) @ value over the last two axes, with the score matrix transposed (keys x queries).

    Queries are the innermost axis of every intermediate, so a block of query rows is one set of vectors:
    the scores, the softmax statistics (max, sum: per query, reduced over keys) and the weighted sum of
    values are all computed on full-width vectors whatever the key count or head width.
    """
    from tvm import te, topi

    *lead, rows, depth = q.shape
    keys, width = key_t.shape[-1], value.shape[-1]
    q_t = te.compute((*lead, depth, rows), lambda *x: q[(*x[:-2], x[-1], x[-2])], name="attention_query_t")
    k = te.reduce_axis((0, depth), name="k")
    scores = te.compute((*lead, keys, rows),
                        lambda *x: te.sum(key_t[(*x[:-2], k, x[-2])] * q_t[(*x[:-2], k, x[-1])], axis=k), name=SCORES)
    j = te.reduce_axis((0, keys), name="j")
    top = te.compute((*lead, rows), lambda *x: te.max(scores[(*x[:-1], j, x[-1])], axis=j), name=MAX)
    shifted = te.compute((*lead, keys, rows), lambda *x: scores[x] - top[(*x[:-2], x[-1])], name=SHIFTED)
    weights = topi.fast_exp(shifted)
    j_sum = te.reduce_axis((0, keys), name="j_sum")
    total = te.compute((*lead, rows), lambda *x: te.sum(weights[(*x[:-1], j_sum, x[-1])], axis=j_sum),
                       name=SUM)
    j_out = te.reduce_axis((0, keys), name="j_out")
    weighted = te.compute((*lead, width, rows),
                          lambda *x: te.sum(value[(*x[:-2], j_out, x[-2])] * weights[(*x[:-2], j_out, x[-1])],
                                            axis=j_out), name=WEIGHTED)
    return te.compute((*lead, rows, width), lambda *x: weighted[(*x[:-2], x[-1], x[-2])] / total[x[:-1]],
                      name=OUTPUT)


def fuse_attention(mod: Any) -> Any:
    """Replace matmul(softmax(matmul(q, k_t), axis=-1), v) over 4-D tensors by one `fused_attention` kernel.

    Self- and cross-attentions alike; the query count must be a multiple of QUERY_MULTIPLE (a vector of
    queries on every profile).
    """
    from tvm import relax
    from tvm.relax import expr_functor

    @expr_functor.mutator
    class AttentionFuser(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            found = self._attention(call)
            if found is None:
                return call
            return self.builder_.call_te(_attention_te, *found, primfunc_name_hint=NAME,
                                         primfunc_attrs={"op_pattern": 8})

        def _producer(self, expr: Any, op_name: str) -> Any:
            bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
            return bound if isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == op_name else None

        def _attention(self, call: Any) -> tuple[Any, Any, Any] | None:
            if getattr(call.op, "name", "") != "relax.matmul":
                return None
            softmax = self._producer(call.args[0], "relax.nn.softmax")
            if softmax is None or int(softmax.attrs.axis) not in (-1, 3):
                return None
            scores = self._producer(softmax.args[0], "relax.matmul")
            if scores is None:
                return None
            q, key_t, value = scores.args[0], scores.args[1], call.args[1]
            shapes = [static_shape(x) for x in (q, key_t, value)]
            if any(s is None or len(s) != 4 for s in shapes) or shapes[0][-2] % QUERY_MULTIPLE:
                return None
            return q, key_t, value

    fuser = AttentionFuser(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            fuser.builder_.update_func(gv, fuser.visit_expr(func))
    return relax.transform.DeadCodeElimination()(fuser.builder_.get())


def attention_tiles(queries: int, keys: int, width: int, profile: CpuProfile) -> tuple[int, int, int]:
    """(queries per block, keys per score register block, value columns per output register block)."""
    block = largest_tile(queries, 2 * profile.lanes)
    query_vectors = max(1, block // profile.lanes)
    per_query_vector = max(1, profile.accumulators // query_vectors)
    return block, largest_tile(keys, per_query_vector), largest_divisor(width, per_query_vector)


class AttentionRule(KernelRule):
    """The fused attention kernel, per block of queries in parallel, with its score slice kept in cache."""

    def schedule(self, sch: Any, profile: CpuProfile) -> bool:
        names = block_names(sch)
        if SCORES not in names or names[-1] != OUTPUT:
            return False
        output = sch.get_sblock(OUTPUT)
        *lead, row, column = sch.get_loops(output)
        scores = sch.get_sblock(SCORES)
        extents = static_extents(sch, [row, sch.get_loops(scores)[-3], column])
        if extents is None or extents[0] % QUERY_MULTIPLE:
            return False
        rows, key_tile, column_tile = attention_tiles(*extents, profile)
        sch.compute_inline(sch.get_sblock(SHIFTED))
        names.remove(SHIFTED)
        row_outer, row_inner = sch.split(row, [None, rows])
        sch.reorder(*lead, row_outer, column, row_inner)
        query_block = sch.fuse(*lead, row_outer)
        sch.parallel(query_block)
        for name in reversed(names[:-1]):
            sch.compute_at(sch.get_sblock(name), query_block)
        products = {SCORES: key_tile, WEIGHTED: column_tile}
        for name, tile in products.items():
            block = sch.get_sblock(name)
            outer_axis, query, reduction = sch.get_loops(block)[1:]
            outer, inner = sch.split(outer_axis, [None, tile])
            accumulate_in_registers(sch, block, block, [], outer, [reduction], inner, query)
        for name in (MAX, SUM):
            block = sch.get_sblock(name)
            query, keys = sch.get_loops(block)[1:]
            sch.reorder(keys, query)
            sch.vectorize(query)
            sch.decompose_reduction(block, keys)
        for name in names:
            if name not in products and name not in (MAX, SUM):
                sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])
        return True
