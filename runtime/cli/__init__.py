"""The `sdaot` command line, one module per command group: listing (models, samplers, presets, artifacts),
generate, compile, bench and serve. Only `compile` and `bench` reach into `sdaot.compiler` and
`sdaot.benchmarks`, and only `serve` into the serving wing."""

from __future__ import annotations

import sys

import click

from ..errors import SdaotError
from ..threads import use_all_cores
from . import bench, compile, generate, listing, serve


class SdaotGroup(click.Group):
    """Turns sdaot's own errors into a one-line message and exit status 2 instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SdaotError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=SdaotGroup)
def main() -> None:
    """sdaot: ahead-of-time compiled Stable Diffusion with a PyTorch fallback, served over HTTP."""
    use_all_cores()


for command in (listing.models, listing.samplers, listing.presets, generate.generate, compile.compile,
                listing.artifacts, bench.bench, serve.serve):
    main.add_command(command)
