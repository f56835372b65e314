"""sdaot runtime: the core (model registry, pipeline, components and their backends, artifacts), the serving
wing (`serve/`) and the command line (`cli/`, the only part that reaches into the compiler and the benchmarks)."""

from importlib.metadata import version

__version__ = version("sdaot")  # one place: pyproject.toml
