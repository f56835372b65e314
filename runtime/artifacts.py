"""Compiled artifacts on disk: layout, manifest, listing and the checks made before one is loaded.

An artifact is one folder `<root>/<model>/<component>/<resolution|any>-b<batch>-<target key>/` holding
`manifest.json`, `model.onnx` (weights are graph inputs, not stored) and, for TVM, `lib.so`. The compiler
writes it into a temporary sibling folder and renames it into place, so a folder with a manifest is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


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


def weights_signature(weights: list[dict[str, Any]]) -> str:
    """Hash of the weight inputs' names, shapes and dtypes: an artifact fits only the architecture it was built for."""
    text = json.dumps([[w["name"], list(w["shape"]), w["dtype"]] for w in weights])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolution_key(resolution: tuple[int, int] | None) -> str:
    """'WIDTHxHEIGHT' as the API and the reference's tvm tables write it, or 'any' for size-free components."""
    return "any" if resolution is None else f"{resolution[0]}x{resolution[1]}"


@dataclass(frozen=True)
class Artifact:
    """One compiled component as found on disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def component(self) -> str:
        return self.manifest["component"]

    @property
    def resolution(self) -> str:
        return self.manifest["resolution"]

    @property
    def batch(self) -> int:
        return self.manifest["batch"]

    @property
    def target_key(self) -> str:
        return self.manifest["target_key"]

    def size_bytes(self) -> int:
        """Bytes on disk of every file of the artifact."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def summary(self) -> dict[str, Any]:
        """The listing row of `sdaot artifacts`."""
        m = self.manifest
        return {
            "model": m["model"], "component": m["component"], "resolution": m["resolution"], "batch": m["batch"],
            "target": m["target_key"], "tuned": m.get("tuned", False), "size_bytes": self.size_bytes(),
            "path": str(self.path),
        }


def list_artifacts(root: Path | None = None) -> list[Artifact]:
    """Every complete artifact under root (folders being written have no manifest yet and are skipped)."""
    root = root or default_root()
    found = []
    for manifest in sorted(root.glob(f"*/*/*/{MANIFEST}")):
        if manifest.parent.name.startswith("."):
            continue
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if data.get("format_version") == FORMAT_VERSION:
            found.append(Artifact(manifest.parent, data))
    return found


def artifact_dir(root: Path, model: str, component: str, resolution: tuple[int, int] | None, batch: int,
                 target_key: str) -> Path:
    """The folder of one (model, component, resolution, batch, target) artifact."""
    return root / model / component / f"{resolution_key(resolution)}-b{batch}-{target_key}"
