"""Ray scale-out on a local cluster (2 CPUs): `sdaot compile --ray` builds each job as a task and writes what
a local compile writes."""

import json

import pytest
import ray
from click.testing import CliRunner

from sdaot.runtime.cli import main

COMPONENTS = ("text_encoder", "vae_decoder", "vae_encoder")
JOBS = ["--model", "SD1.5", "--weights", "tiny", "--resolution", "64x64", "--components", ",".join(COMPONENTS),
        "--conv-algorithm", "winograd", "--weight-transforms", "once"]  # as compiled_root builds SD1.5
BUILD_FACTS = ("created", "build_seconds")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def manifests(root):
    found = {}
    for path in sorted(p for c in COMPONENTS for p in (root / "SD1.5" / c).rglob("manifest.json")):
        manifest = json.loads(path.read_text())
        found[str(path.parent.relative_to(root))] = {k: v for k, v in manifest.items() if k not in BUILD_FACTS}
    return found


@pytest.mark.slow
def test_compile_on_ray_writes_what_a_local_compile_writes(cluster, compiled_root, tmp_path):
    remote = CliRunner().invoke(main, ["compile", *JOBS, "--ray", "--out", str(tmp_path / "ray")],
                                catch_exceptions=False)
    assert remote.exit_code == 0, remote.output
    assert "each build reserving 2 CPUs" in remote.output
    assert sorted(line.split("]")[0] for line in remote.output.splitlines() if " done in " in line) == \
        ["[1/3", "[2/3", "[3/3"], "one progress line per finished job"
    built = manifests(tmp_path / "ray")
    assert len(built) == 3 and built == manifests(compiled_root)
    assert not list((tmp_path / "ray").rglob(".tmp-*")), "nothing half-written is left"


def test_tuning_on_ray_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["compile", *JOBS, "--ray", "--tune", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "error: ray: tuning is not distributed yet" in result.output
    assert not any(tmp_path.iterdir())
