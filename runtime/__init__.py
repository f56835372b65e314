"""sdaot runtime: model registry, generation pipeline, backends and the HTTP server (imports no compiler code)."""

from importlib.metadata import version

__version__ = version("sdaot")  # one place: pyproject.toml
