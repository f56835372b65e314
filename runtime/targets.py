"""TVM targets: what `--target cpu|cuda|<JSON>` means, and the short key artifacts are filed under."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from .errors import InvalidRequestError


def resolve_target(spec: str = "cpu") -> Any:
    """A tvm.target.Target for 'cpu' (this host's CPU), 'cuda' (sm_90 unless given as JSON) or a JSON dict."""
    import tvm

    if spec == "cpu":
        return tvm.target.Target.from_device(tvm.cpu())
    if spec == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": "sm_90", "max_num_threads": 1024, "thread_warp_size": 32})
    try:
        config = json.loads(spec)
    except ValueError as exc:
        raise InvalidRequestError(f"target must be cpu, cuda or a JSON target dict (got {spec!r})",
                                  param="target") from exc
    try:
        return tvm.target.Target(config)
    except Exception as exc:  # TVM raises its own error types for bad target dicts
        raise InvalidRequestError(f"invalid target {spec!r}: {exc}", param="target") from exc


def target_key(target: Any) -> str:
    """A short, filename-safe name of a target: llvm-<cpu> or cuda-<arch>."""
    attrs = target.attrs
    detail = attrs.get("mcpu") if target.kind.name == "llvm" else attrs.get("arch")
    return f"{target.kind.name}-{detail or 'generic'}"


def target_json(target: Any) -> dict[str, Any]:
    """The target as the JSON dict TVM accepts back."""
    return json.loads(str(target))


# Instruction-set features whose instructions generated kernels contain. LLVM's list for a CPU name also
# holds tuning hints (fast-*), system instructions (clzero, wbnoinvd) and AMD's SSE4a, which no kernel
# uses; comparing those would refuse an AMD build on an Intel machine for nothing.
ISA_FEATURE_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "bmi", "popcnt", "neon", "sve", "fp-armv8")
UNUSED_ISA_FEATURES = frozenset({"sse4a"})


def _isa_features(target: Any) -> frozenset[str]:
    from tvm.target import codegen

    return frozenset(f for f in codegen.llvm_get_cpu_features(target)
                     if f.startswith(ISA_FEATURE_PREFIXES) and f not in UNUSED_ISA_FEATURES)


@cache
def _host_isa_features() -> frozenset[str]:
    return _isa_features(resolve_target("cpu"))


@cache
def runs_on_this_cpu(key: str, target: str) -> bool:
    """Whether a library built for `target` (its JSON text, filed under `key`) runs on this machine's CPU: the
    host's own target, or a CPU target for the same architecture whose instruction sets the host all has (an
    AVX2 build on an AVX-512 machine). Feature names are LLVM's for each CPU name, so the check errs on
    refusing (LLVM's name for a virtual machine's CPU may list fewer features than the CPU has)."""
    import tvm

    host = resolve_target("cpu")
    if key == target_key(host):
        return True
    try:
        built_for = tvm.target.Target(json.loads(target))
    except Exception:  # an unreadable target is one this machine cannot vouch for
        return False
    if built_for.kind.name != "llvm" or _architecture(built_for) != _architecture(host):
        return False
    return _isa_features(built_for) <= _host_isa_features()


def _architecture(target: Any) -> str:
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
    return triple.split("-")[0]
