"""Hand-written CPU kernels, one kind per module, each holding its graph rewrite and its schedule side by side.

In the manner of TVM's dlight, each module has one schedule rule whose strategy its docstring states in
numbered steps, and every rule sizes its register blocks and tiles from the target's CpuProfile
(profile.py) rather than from one machine. The rules come in two named lists:

- `RULES_BEFORE_TUNING`: attention (attention.py), direct convolutions (convolution.py), matmuls
  (matmul.py; in bf16: bf16_matmul.py, or amx_matmul.py's tile kernel, scheduled by hand and needing no
  rule) and Winograd's transforms (winograd.py). They run at the machine's matmul peak, so they are
  applied before tuning, which then leaves these kernels alone.
- `FALLBACK_RULES`: for kernels that have neither such a schedule nor a tuning record: dlight's row
  reduction, tiled transposes (transpose.py) and parallel loops for everything else (parallel.py).
"""

from __future__ import annotations

from typing import Any

from tvm.s_tir import dlight

from .attention import AttentionRule
from .bf16_matmul import Bf16MatmulRule
from .convolution import ConvolutionRule
from .matmul import MatmulRule
from .parallel import ParallelFallback
from .profile import CpuProfile, cpu_profile
from .transpose import TiledTranspose
from .winograd import WinogradTransformRule

RULES_BEFORE_TUNING = (AttentionRule(), ConvolutionRule(), Bf16MatmulRule(), MatmulRule(), WinogradTransformRule())
FALLBACK_RULES = (dlight.cpu.Reduction(), TiledTranspose(), ParallelFallback())

__all__ = ["FALLBACK_RULES", "RULES_BEFORE_TUNING", "CpuProfile", "apply_fallback_rules",
           "apply_rules_before_tuning", "cpu_profile"]


def apply_rules_before_tuning(mod: Any, target: Any) -> Any:
    """Schedule every attention, convolution, matmul and Winograd transform of a CPU module; tuning then skips
    them."""
    with target:
        return dlight.ApplyDefaultSchedule(*RULES_BEFORE_TUNING)(mod)


def apply_fallback_rules(mod: Any, target: Any) -> Any:
    """Give every kernel still without a schedule (after the rules before tuning and the tuning records) a
    default one: row reduction, tiled transpose or parallel loops."""
    with target:
        return dlight.ApplyDefaultSchedule(*FALLBACK_RULES)(mod)
