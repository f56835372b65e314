"""Fast approximations of the transcendental functions in an imported graph.

LLVM turns an exact exp, erf, tanh or sigmoid into one scalar libm call per element, so on CPUs the
attention softmax alone took 26 % of a UNet call. TVM's fast versions are polynomial and vectorize; their
relative error (~1e-6) is far below what the pipeline's images resolve (tests: PSNR against torch).
"""

from __future__ import annotations

from typing import Any


def _fast_sigmoid(x: Any) -> Any:
    from tvm import te, topi

    decay = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: 1.0 / (1.0 + decay(*i)), name="fast_sigmoid")


def use_fast_math(mod: Any, other_legalizations: dict[str, Any] | None = None) -> Any:
    """Softmax, exp, erf and tanh through TVM's `FastMathTransform`, sigmoid (SiLU, quick-GELU) through fast exp.

    This lowers every operator to TIR, so the caller's own lowerings of other operators (`other_legalizations`,
    as LegalizeOps takes them) are applied in the same pass."""
    from tvm import relax

    mod = relax.transform.FastMathTransform()(mod)
    sigmoid = {"relax.sigmoid": lambda bb, call: bb.call_te(_fast_sigmoid, call.args[0])}
    return relax.transform.LegalizeOps({**sigmoid, **(other_legalizations or {})})(mod)
