"""Who may call the server: API keys from SDAOT_API_KEYS and a key file, and the refusal to expose a server
without them beyond loopback."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import InvalidRequestError
from .access import is_loopback


def load_api_keys(key_file: Path | None = None) -> list[str]:
    """The keys of SDAOT_API_KEYS (comma-separated) and of `key_file` (one per line)."""
    keys = [k.strip() for k in os.environ.get("SDAOT_API_KEYS", "").split(",") if k.strip()]
    if key_file:
        keys += [line.strip() for line in key_file.read_text().splitlines() if line.strip()]
    return keys


def guard_exposure(host: str, keys: list[str], insecure_no_auth: bool, say: Callable[[str], None]) -> None:
    """A keyless server is for loopback only: refuse another address unless told `insecure_no_auth`, and say
    which way the server runs."""
    if not keys and not is_loopback(host):
        if not insecure_no_auth:
            raise InvalidRequestError(f"refusing to serve {host} without API keys: set SDAOT_API_KEYS or "
                                      "--api-key-file, or pass --insecure-no-auth", param="host")
        say(f"WARNING: serving {host} with no authentication")
    elif not keys:
        say(f"no API keys configured: serving loopback address {host} only, without authentication")
