"""The choices of how an artifact is built, named once: `sdaot compile`'s flags, the compiler's BuildOptions and
the manifest the runtime reads all take them from here; the first of each is the default."""

from __future__ import annotations

from typing import Literal, get_args

ConvAlgorithm = Literal["direct", "winograd", "auto"]
"""3x3 convolutions: directly, by Winograd F(4x4,3x3) wherever it fits, or by Winograd where it saves time."""
WeightTransforms = Literal["per-call", "once"]
"""What derives from the weights alone (transposes, Winograd's weight transforms): every call, or once at load."""
Precision = Literal["fp32", "bf16"]
"""fp32 throughout, or bf16 matmuls accumulating in fp32."""

CONV_ALGORITHMS: tuple[str, ...] = get_args(ConvAlgorithm)
WEIGHT_TRANSFORMS: tuple[str, ...] = get_args(WeightTransforms)
PRECISIONS: tuple[str, ...] = get_args(Precision)
