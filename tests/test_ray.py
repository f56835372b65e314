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


@pytest.mark.slow
def test_tuning_on_ray_merges_each_jobs_records_into_the_shared_database(cluster, tmp_path):
    """Two jobs (two components: different workloads) tune in their own copies; the shared database gets both
    jobs' records and tuning goals (what lets a later run skip them). Bounded by tasks and trials, not the
    clock."""
    args = ["compile", "--model", "SD1.5", "--weights", "tiny", "--components", "text_encoder,vae_decoder",
            "--resolution", "64x64",
            "--tune", "--tune-budget", "24h", "--trials-per-task", "1", "--tune-tasks", "1", "--ray",
            "--out", str(tmp_path)]
    first = CliRunner().invoke(main, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    (db,) = (tmp_path / "tuning").iterdir()
    assert f"new tuning records from 2 job(s) into {db}" in first.output
    assert not (db / "ray-work").exists(), "the private copies are deleted once merged"
    workloads = [json.loads(line)[0] for line in (db / "database_workload.json").read_text().splitlines()]
    tuned = {workloads[json.loads(line)[0]] for line in (db / "database_tuning_record.json").read_text().splitlines()}
    assert len(tuned) == 2, "one tuned workload per job"
    assert set(json.loads((db / "attempts.json").read_text())) == tuned, "each job's tuning goal, by workload"
    built = [json.loads(p.read_text()) for p in tmp_path.rglob("manifest.json")]
    assert len(built) == 2
    for manifest in built:
        assert manifest["tuning_database"] == str(db) and manifest["tuned_functions"] > 0
        assert manifest["tuning"]["tasks_tuned_now"] == 1
