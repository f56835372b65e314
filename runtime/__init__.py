"""sdaot runtime: model registry, generation pipeline, backends and the HTTP server (imports no compiler code)."""
