"""Compiled artifacts on disk: layout, manifest, listing and the checks made before one is loaded.

An artifact is one folder `<root>/<model>/<component>/<resolution|any>-b<batch>-<target key>/` holding
`manifest.json`, `model.onnx` (weights are graph inputs, not stored) and, for TVM, `lib.so`. The compiler
writes it into a temporary sibling folder and renames it into place, so a folder with a manifest is complete.
The manifest is one typed, validated object (`Manifest`): the compiler writes it, everyone else reads it,
and a manifest that is not valid JSON or lacks a field is skipped with a warning naming the file and field.

A `lib.so` is native code that runs in whatever process loads it: whoever can write the artifacts folder can
run code there. The hash in the manifest only catches damage; the loader hashes the very bytes it loads
(`read_verified`), and `warn_if_writable` names folders and libraries that others than their owner can write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from typing_extensions import TypedDict

from .build_choices import CONV_ALGORITHMS, PRECISIONS, WEIGHT_TRANSFORMS, ConvAlgorithm, Precision, WeightTransforms
from .resolution import Resolution

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

log = logging.getLogger(__name__)


class TensorSpec(TypedDict):
    """One graph input or weight: its ONNX name, static shape and dtype."""

    name: str
    shape: list[int]
    dtype: str


class Manifest(BaseModel):
    """What an artifact was built from and for, and the hashes of its files."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format_version: Literal[1]
    sdaot_version: str
    tvm_version: str
    model: str
    family: str
    component: str
    resolution: str
    batch: int = Field(ge=1)
    inputs: list[TensorSpec]
    outputs: list[str]
    weights: list[TensorSpec]
    weights_signature: str
    weight_source: str
    target: dict[str, Any]
    target_key: str
    onnx_sha256: str
    lib_sha256: str | None = Field(description="None for an ONNX-only folder (bench scratch), which has no lib.so")
    tuned: bool = False
    tuned_functions: int = 0
    total_functions: int = 0
    tuning: dict[str, Any] | None = None
    tuning_database: str | None = None
    conv_algorithm: ConvAlgorithm = CONV_ALGORITHMS[0]
    winograd_convolutions: int = 0
    weight_transforms: WeightTransforms = WEIGHT_TRANSFORMS[0]
    precision: Precision = PRECISIONS[0]
    build_seconds: float = 0.0
    created: str

    def write(self, folder: Path) -> None:
        """Write manifest.json into the artifact folder."""
        (folder / MANIFEST).write_text(self.model_dump_json(indent=2))

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """Read and validate a folder's manifest.json; ValueError says which file and what is wrong."""
        path = folder / MANIFEST
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'document'}: {e['msg']}" for e in exc.errors()[:3])
            raise ValueError(f"{path}: {problems}") from exc


def default_root() -> Path:
    """Where artifacts live unless --artifacts says otherwise (SDAOT_ARTIFACTS, else ./artifacts)."""
    return Path(os.environ.get("SDAOT_ARTIFACTS", "artifacts"))


def file_sha256(path: Path) -> str:
    """Hash of a file's bytes, used to catch truncated or altered libraries."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_verified(path: Path, sha256: str | None) -> bytes | None:
    """The file's bytes, read once, if they hash to `sha256`; None if the file is missing or its bytes differ.
    The caller loads these very bytes, never the file again, so what was checked is what runs."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if sha256 is not None and hashlib.sha256(data).hexdigest() == sha256 else None


def writable_by_others(path: Path) -> bool:
    """Whether anyone but the owner (its group, or everyone) may write `path`."""
    try:
        return bool(path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    except OSError:
        return False


def warn_if_writable(root: Path, artifacts: list[Artifact]) -> list[Path]:
    """Log a warning for the root, each artifact folder (and the folders between) and each lib.so that its
    group or others may write: whoever can write there can run code in this process. Returns those paths."""
    paths = {root} | {p for a in artifacts for p in (a.path, a.path.parent, a.path.parent.parent, a.path / "lib.so")}
    loose = sorted(p for p in paths if writable_by_others(p))
    for path in loose:
        log.warning("%s is writable by group or others: whoever can write it can run code in this server "
                    "(lib.so is native code); chmod go-w it", path)
    return loose


def weights_signature(weights: list[dict[str, Any]]) -> str:
    """Hash of the weight inputs' names, shapes and dtypes: an artifact fits only the architecture it was built for."""
    text = json.dumps([[w["name"], list(w["shape"]), w["dtype"]] for w in weights])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolution_key(resolution: Resolution | None) -> str:
    """The resolution as artifact folders and manifests spell it (WIDTHxHEIGHT), 'any' for size-free components."""
    return "any" if resolution is None else str(resolution)


@dataclass(frozen=True)
class Artifact:
    """One compiled component as found on disk."""

    path: Path
    manifest: Manifest

    @property
    def label(self) -> str:
        """The artifact's folder relative to the root (model/component/variant): how clients are told of it."""
        return "/".join(self.path.parts[-3:])

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def component(self) -> str:
        return self.manifest.component

    @property
    def resolution(self) -> str:
        return self.manifest.resolution

    @property
    def batch(self) -> int:
        return self.manifest.batch

    @property
    def target_key(self) -> str:
        return self.manifest.target_key

    @property
    def precision(self) -> str:
        return self.manifest.precision

    def size_bytes(self) -> int:
        """Bytes on disk of every file of the artifact."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def summary(self) -> dict[str, Any]:
        """The listing row of `sdaot artifacts`."""
        m = self.manifest
        return {"model": m.model, "component": m.component, "resolution": m.resolution, "batch": m.batch,
                "target": m.target_key, "precision": m.precision, "tuned": m.tuned, "size_bytes": self.size_bytes(),
                "path": str(self.path)}


def list_artifacts(root: Path | None = None) -> list[Artifact]:
    """Every complete artifact under root (folders being written have no manifest yet and are skipped; so
    are unreadable or invalid manifests, each with a warning)."""
    root = root or default_root()
    found = []
    for path in sorted(root.glob(f"*/*/*/{MANIFEST}")):
        if path.parent.name.startswith("."):
            continue
        try:
            found.append(Artifact(path.parent, Manifest.read(path.parent)))
        except (OSError, ValueError) as exc:
            log.warning("skipping artifact %s: %s", path.parent, exc)
    return found


def artifact_dir(root: Path, model: str, component: str, resolution: Resolution | None, batch: int,
                 target_key: str, precision: str = "fp32") -> Path:
    """The folder of one (model, component, resolution, batch, target, precision) artifact; fp32 ones carry no
    precision in their name (as before bf16 existed)."""
    suffix = "" if precision == "fp32" else f"-{precision}"
    return root / model / component / f"{resolution_key(resolution)}-b{batch}-{target_key}{suffix}"


def uses_amx(artifact: Artifact) -> bool:
    """Whether the artifact's kernels hold AMX instructions: bf16, built for a target with AMX-BF16."""
    if artifact.precision != "bf16" or artifact.manifest.target.get("kind") != "llvm":
        return False
    try:
        from .targets import bf16_unit_of
    except ImportError:
        return False
    return bf16_unit_of(json.dumps(artifact.manifest.target, sort_keys=True)) == "amx"
