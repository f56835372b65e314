"""`sdaot models | samplers | presets | artifacts`: what this installation offers and has built."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..registry import all_models


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the model names sdaot serves, with family, native size and defaults."""
    rows = [
        {
            "name": m.name, "family": m.family, "native_resolution": str(m.native_resolution),
            "steps": m.default_steps, "cfg_scale": m.default_cfg_scale, "sampler": m.default_sampler,
            "hub_id": m.hub_id, "tvm_resolutions": [str(r) for r in m.tvm_resolutions], "description": m.description,
        }
        for m in all_models()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    fmt = "{:<17} {:<5} {:<10} {:>5} {:>5}  {:<8} {}"
    click.echo(fmt.format("MODEL", "FAM", "NATIVE", "STEPS", "CFG", "SAMPLER", "WEIGHTS (hub id)"))
    for r in rows:
        click.echo(fmt.format(r["name"], r["family"], r["native_resolution"], r["steps"], r["cfg_scale"],
                              r["sampler"], r["hub_id"]))


@click.command()
def samplers() -> None:
    """List sampler names and the diffusers scheduler each one uses."""
    from ..samplers import SAMPLERS

    for spec in SAMPLERS.values():
        opts = ", ".join(f"{k}={v}" for k, v in spec.options.items())
        click.echo(f"{spec.name:<26} {spec.scheduler}" + (f" ({opts})" if opts else ""))


@click.command()
def presets() -> None:
    """List style presets and their prompt templates."""
    from ..presets import presets as all_presets

    for name, template in all_presets().items():
        click.echo(f"{name:<22} {template['prompt']}")



@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--dir", "root", type=click.Path(path_type=Path), default=None, help="Artifacts folder.")
def artifacts(as_json: bool, root: Path | None) -> None:
    """List compiled artifacts: model, component, resolution, batch, target, precision, tuned, size on disk, and
    whether `--backend auto|tvm` runs it on this machine (where fp32 and bf16 twins exist, the faster one here)."""
    from ..artifacts import list_artifacts
    from ..selection import which_runs

    found = list_artifacts(root)
    runs = which_runs(found)
    rows = [a.summary() | {"runs": runs[a.path]} for a in found]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    fmt = "{:<17} {:<15} {:<10} {:>5}  {:<16} {:<9} {:<5} {:>9}  {}"
    click.echo(fmt.format("MODEL", "COMPONENT", "RESOLUTION", "BATCH", "TARGET", "PRECISION", "TUNED", "SIZE", "RUNS"))
    for r in rows:
        click.echo(fmt.format(r["model"], r["component"], r["resolution"], r["batch"], r["target"], r["precision"],
                              "yes" if r["tuned"] else "no", f"{r['size_bytes'] / 1e6:.1f} MB", r["runs"]))
    if not rows:
        click.echo("(none: build some with `sdaot compile --model SD1.5 --resolution 512x512`)")

