"""Static tensor shapes of Relax expressions, for graph rewrites that only apply to known sizes."""

from __future__ import annotations

from typing import Any


def static_shape(expr: Any) -> list[int] | None:
    """The shape of a Relax tensor expression as integers, or None when any dimension is symbolic or unknown."""
    from tvm import tirx

    shape = getattr(expr.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    dims = list(shape.values)
    return [int(d) for d in dims] if all(isinstance(d, tirx.IntImm) for d in dims) else None
