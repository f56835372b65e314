"""How artifacts are built: one frozen value, checked once against the target, carried from the command line
through the compile plan, every job (local or on Ray) and the TVM build into the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdaot.runtime.build_choices import (
    CONV_ALGORITHMS,
    PRECISIONS,
    WEIGHT_TRANSFORMS,
    ConvAlgorithm,
    Precision,
    WeightTransforms,
)
from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.targets import precision_target

from .tuning import TuningOptions


@dataclass(frozen=True)
class BuildOptions:
    """What `sdaot compile` was told about how to build, beyond what (model, sizes) and where (target).

    `conv_algorithm`: 3x3 convolutions directly, by Winograd F(4x4,3x3) wherever it fits, or where it saves
    time (`auto`). `weight_transforms`: what derives from the weights alone runs on every call, or `once` at
    load. `precision`: fp32 throughout, or bf16 matmuls with fp32 sums. `tuning`: MetaSchedule's database and
    budget, or None to build with the register-blocked rules alone."""

    conv_algorithm: ConvAlgorithm = CONV_ALGORITHMS[0]
    weight_transforms: WeightTransforms = WEIGHT_TRANSFORMS[0]
    precision: Precision = PRECISIONS[0]
    tuning: TuningOptions | None = None

    def check(self, target: Any) -> Any:
        """The target these options build for (with the CPU features bf16 needs), or InvalidRequestError naming
        the option that does not fit it: callers check before loading any weights."""
        if self.conv_algorithm not in CONV_ALGORITHMS:
            raise InvalidRequestError(f"must be one of {', '.join(CONV_ALGORITHMS)} (got {self.conv_algorithm!r})",
                                      param="conv_algorithm")
        if self.weight_transforms not in WEIGHT_TRANSFORMS:
            raise InvalidRequestError(f"must be one of {', '.join(WEIGHT_TRANSFORMS)} (got "
                                      f"{self.weight_transforms!r})", param="weight_transforms")
        if self.winograd and target.kind.name != "llvm":
            raise InvalidRequestError(f"{self.conv_algorithm} is implemented for CPU targets only",
                                      param="conv_algorithm")
        return precision_target(target, self.precision)

    @property
    def winograd(self) -> bool:
        """Whether 3x3 convolutions may be computed by Winograd."""
        return self.conv_algorithm != "direct"

    @property
    def transforms_once(self) -> bool:
        """Whether weight-derived tensors are computed once at load (and after a weight changes)."""
        return self.weight_transforms == "once"

    @property
    def bf16(self) -> bool:
        """Whether matmuls run in bf16."""
        return self.precision == "bf16"

    def manifest_fields(self) -> dict[str, Any]:
        """The options as the manifest records them."""
        return {"conv_algorithm": self.conv_algorithm, "weight_transforms": self.weight_transforms,
                "precision": self.precision,
                "tuning_database": str(self.tuning.database) if self.tuning else None}


DEFAULT_BUILD = BuildOptions()
"""The options of a plain `sdaot compile`."""
