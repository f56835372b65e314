"""TVM targets: what `--target cpu|cuda|<JSON>` means, and the short key artifacts are filed under."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from .amx import cpu_flags, host_has_amx
from .build_choices import PRECISIONS
from .errors import InvalidRequestError


def resolve_target(spec: str = "cpu") -> Any:
    """A tvm.target.Target for 'cpu' (this host's CPU), 'cuda' (this machine's GPU architecture; sm_90, an
    H100/H200, where torch sees no GPU) or a JSON dict."""
    import tvm

    if spec == "cpu":
        return tvm.target.Target.from_device(tvm.cpu())
    if spec == "cuda":
        import torch

        arch = cuda_target_key(torch.device("cuda")).removeprefix("cuda-") if torch.cuda.is_available() else "sm_90"
        return tvm.target.Target({"kind": "cuda", "arch": arch, "max_num_threads": 1024, "thread_warp_size": 32})
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


def cuda_target_key(device: Any) -> str:
    """The artifact target key of a CUDA GPU (`cuda-sm_90` for an H100/H200), as `sdaot compile --target cuda`
    files its builds for that GPU."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda-sm_{major}{minor}"


@cache
def host_target_key() -> str | None:
    """The artifact target key of this machine's CPU, or None when TVM cannot be imported."""
    try:
        return target_key(resolve_target("cpu"))
    except ImportError:
        return None


def device_target_key(device: Any) -> str | None:
    """The artifact target key of a torch device, or None when TVM cannot be imported (for the CPU)."""
    return cuda_target_key(device) if device.type == "cuda" else host_target_key()


def target_json(target: Any) -> dict[str, Any]:
    """The target as the JSON dict TVM accepts back."""
    return json.loads(str(target))


CPUINFO = Path("/proc/cpuinfo")


@cache
def host_has_avx512_bf16() -> bool:
    """Whether this machine's CPU has AVX-512 BF16. Read from the kernel's CPU flags: LLVM's name for a virtual
    machine's CPU (`rocketlake` for a Sapphire Rapids guest here) can lack features the CPU has."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in text.splitlines())


def precision_target(target: Any, precision: str) -> Any:
    """The target to build `precision` for. For bf16, a CPU target with AMX-BF16 (its matmuls then run on the
    tile unit, kernels/amx_matmul.py) or else with AVX-512 BF16 (`vdpbf16ps`, kernels/bf16_matmul.py); this
    host's target gains the feature its CPU reports in /proc/cpuinfo where LLVM's name for it does not list it.

    Raises InvalidRequestError (param `precision`) where the target cannot run bf16 kernels."""
    import tvm

    if precision not in PRECISIONS:
        raise InvalidRequestError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})",
                                  param="precision")
    if precision == "fp32":
        return target
    if target.kind.name != "llvm":
        raise InvalidRequestError("bf16 is implemented for CPU targets with AVX-512 BF16 only", param="precision")
    features = _isa_features(target)
    host = target_key(target) == target_key(resolve_target("cpu"))
    reported = (*(AMX_FEATURES if host_has_amx() else ()), *(("avx512bf16",) if host_has_avx512_bf16() else ()))
    missing = [f for f in reported if f not in features] if host else []
    if missing:
        config = target_json(target)
        config["mattr"] = [*config.get("mattr", []), *(f"+{f}" for f in missing)]
        return tvm.target.Target(config)
    if "avx512bf16" in features or set(AMX_FEATURES) <= features:
        return target
    raise InvalidRequestError(f"bf16 needs a CPU with AVX-512 BF16 (Zen 4, Cooper Lake, Sapphire Rapids and later); "
                              f"target {target_key(target)} has none", param="precision")


AMX_FEATURES = ("amx-tile", "amx-bf16")
"""The LLVM features AMX bf16 kernels need; a target without them aborts LLVM on the first tile intrinsic."""


def bf16_unit(target: Any) -> str | None:
    """What a CPU target's bf16 matmuls run on: `amx` (tdpbf16ps tiles), `avx512_bf16` (vdpbf16ps vectors) or None."""
    if target.kind.name != "llvm":
        return None
    features = _isa_features(target)
    if set(AMX_FEATURES) <= features:
        return "amx"
    return "avx512_bf16" if "avx512bf16" in features else None


@cache
def bf16_unit_of(target: str) -> str | None:
    """`bf16_unit` of a target given as its JSON text (an artifact manifest's), None where TVM cannot read it."""
    import tvm

    try:
        return bf16_unit(tvm.target.Target(json.loads(target)))
    except Exception:  # an unreadable target runs no bf16 kernels this machine can vouch for
        return None


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
    features = _isa_features(resolve_target("cpu"))
    if host_has_avx512_bf16():
        features |= {"avx512bf16"}
    return features | {flag.replace("_", "-") for flag in cpu_flags() if flag.startswith("amx_")}


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
