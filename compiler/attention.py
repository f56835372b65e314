"""Fuse each attention (matmul -> softmax -> matmul) of an imported graph into one kernel.

The ONNX export spells attention as three ops, so a plain build writes every score matrix to memory and
reads it back twice: at 4096 tokens (SD1.5's 64x64 latent) that is 1 GiB per head group per pass, and the
three kernels spent 3.5 s of a 12 s UNet call moving it. The fused kernel computes a block of query rows'
scores, their softmax and their share of the output while the block is still in cache
(cpu_schedule.py schedules it), as torch's scaled_dot_product_attention does.
"""

from __future__ import annotations

from typing import Any

SCORES = "attention_scores"
OUTPUT = "attention_output"
NAME = "fused_attention"


def _attention_te(q: Any, key_t: Any, value: Any) -> Any:
    """softmax(q @ key_t) @ value over the last two axes, with TVM's fast softmax."""
    from tvm import te, topi

    *lead, rows, depth = q.shape
    columns, width = key_t.shape[-1], value.shape[-1]
    k = te.reduce_axis((0, depth), name="k")
    scores = te.compute((*lead, rows, columns),
                        lambda *i: te.sum(q[(*i[:-1], k)] * key_t[(*i[:-2], k, i[-1])], axis=k), name=SCORES)
    probs = topi.nn.fast_softmax(scores)
    n = te.reduce_axis((0, columns), name="n")
    return te.compute((*lead, rows, width),
                      lambda *i: te.sum(probs[(*i[:-1], n)] * value[(*i[:-2], n, i[-1])], axis=n), name=OUTPUT)


def _static_shape(expr: Any) -> list[int] | None:
    from tvm import tirx

    shape = getattr(expr.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    dims = list(shape.values)
    return [int(d) for d in dims] if all(isinstance(d, tirx.IntImm) for d in dims) else None


def fuse_attention(mod: Any) -> Any:
    """Replace matmul(softmax(matmul(q, k_t), axis=-1), v) over 4-D tensors by one `fused_attention` kernel.

    Only the attentions whose key count is a multiple of 32 (the score vectors' width) are fused; the
    cross-attentions over 77 text tokens keep the three kernels.
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
            shapes = [_static_shape(x) for x in (q, key_t, value)]
            if any(s is None or len(s) != 4 for s in shapes) or shapes[1][-1] % 32:
                return None
            return q, key_t, value

    fuser = AttentionFuser(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            fuser.builder_.update_func(gv, fuser.visit_expr(func))
    return relax.transform.DeadCodeElimination()(fuser.builder_.get())
