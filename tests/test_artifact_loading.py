"""Artifacts are native code: the bytes that were hashed are the bytes loaded, a load failure tells the client
no path or TVM text (the log has them, under the request id), the root is listed at start-up and on SIGHUP
only, and a folder or lib.so that others may write is named in the log."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from test_server import AUTH, start_server

from sdaot.runtime.errors import BackendUnavailableError
from sdaot.runtime.loader import load_pipeline
from sdaot.runtime.resolution import Resolution

QUICK = {"model_name": "SD1.5", "prompt": "x", "height": 64, "width": 64, "steps": 1, "seed": 1}
VAE_64 = {"vae_decoder": (Resolution.parse("64x64"), 1)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real compile of SD1.5's tiny VAE decoder at 64x64: one artifact with a lib.so."""
    root = tmp_path_factory.mktemp("built")
    done = subprocess.run([sys.executable, "-m", "sdaot.runtime.cli", "compile", "--model", "SD1.5", "--weights",
                           "tiny", "--resolution", "64x64", "--components", "vae_decoder", "--out", str(root)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def copy_root(built, dest):
    shutil.copytree(built, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def test_the_library_runs_from_the_bytes_that_were_hashed(built, tmp_path):
    root = copy_root(built, tmp_path / "art")
    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=root)
    component = pipe.selector.select("tvm", VAE_64)["vae_decoder"]
    assert component.backend == "tvm"
    maps = open("/proc/self/maps").read()
    assert "memfd:sdaot-lib.so" in maps and str(root) not in maps, "lib.so was mapped from the artifacts folder"
    lib = next(root.glob("SD1.5/vae_decoder/*/lib.so"))
    lib.write_bytes(lib.read_bytes()[:-1] + b"\1")
    with pytest.raises(BackendUnavailableError, match="lib.so is missing, truncated or altered"):
        load_pipeline("SD1.5", "tiny", artifacts_root=root).selector.select("tvm", VAE_64)


def test_a_library_that_fails_to_load_tells_the_client_no_path_and_no_tvm_text(built, tmp_path, caplog):
    import hashlib

    root = copy_root(built, tmp_path / "art")
    lib = next(root.glob("SD1.5/vae_decoder/*/lib.so"))
    lib.write_bytes(b"\x7fELF but not a library")
    manifest = json.loads((lib.parent / "manifest.json").read_text())
    manifest["lib_sha256"] = hashlib.sha256(lib.read_bytes()).hexdigest()
    (lib.parent / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailableError) as caught:
        load_pipeline("SD1.5", "tiny", artifacts_root=root).selector.select("tvm", VAE_64)
    error = caught.value
    assert "SD1.5/vae_decoder/" in error.message and str(tmp_path) not in error.message
    assert str(lib) in error.detail, "the log gets the path and TVM's own words"
    with caplog.at_level(logging.WARNING, logger="sdaot.errors"):
        told = error.reported("abc123")
    assert told.message.endswith("(details in the server log under request id abc123)") and told.detail is None
    assert str(tmp_path) not in told.message and "abc123" in caplog.text and str(lib) in caplog.text


def server_log(proc) -> str:
    with open(f"/proc/self/fd/{proc.log.fileno()}") as log:  # its own offset: the server keeps writing
        return log.read()


def test_artifacts_are_listed_at_start_up_and_on_sighup_only_and_loose_permissions_are_logged(built, tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    proc, url = start_server(["--models", "SD1.5", "--artifacts", str(root)])
    try:
        def vae_backend() -> str:
            resp = httpx.post(f"{url}/v1/image/generation", json=QUICK, headers=AUTH, timeout=300)
            assert resp.status_code == 200, resp.text
            return resp.json()["backends"]["vae_decoder"]

        assert vae_backend() == "torch"
        copy_root(built / "SD1.5", root / "SD1.5")
        assert vae_backend() == "torch", "a request listed the artifacts folder again"
        lib = next(root.glob("SD1.5/vae_decoder/*/lib.so"))
        lib.chmod(0o666)
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.time() + 60
        while vae_backend() != "tvm":
            assert time.time() < deadline, server_log(proc)
            time.sleep(0.5)
        log = server_log(proc)
        assert f"{lib} is writable by group or others" in log and "run code in this server" in log
        maps = open(f"/proc/{proc.pid}/maps").read()
        assert "memfd:sdaot-lib.so" in maps and str(root) not in maps
    finally:
        proc.terminate()
        proc.wait(timeout=60)
