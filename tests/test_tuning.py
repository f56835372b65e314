"""MetaSchedule tuning applies to the build, resumes without repeating trials, and keeps results right."""

import pytest
from click.testing import CliRunner
from conftest import psnr

from sdaot.runtime.artifacts import list_artifacts
from sdaot.runtime.cli import main
from sdaot.runtime.loader import load_pipeline
from sdaot.runtime.request import parse_request

pytestmark = pytest.mark.slow  # full compiles: `make test` runs them, `make test-quick` does not


def records(db_folder):
    lines = (db_folder / "database_tuning_record.json").read_text().splitlines()
    return [line for line in lines if line.strip()]


def test_tuning_applies_and_resumes_without_duplicate_trials(tmp_path):
    """Tune the heaviest task (both rounds), resume (no new trial), then build without --tune: the stored
    records still apply.

    The work is bounded by tasks and trials, never by the clock: the budget is far beyond what it takes on any
    machine, so the verdict does not depend on the machine's speed."""
    args = ["compile", "--model", "SD1.5", "--resolution", "64x64", "--components", "text_encoder", "--tune",
            "--tune-budget", "24h", "--trials-per-task", "2", "--tune-tasks", "1", "--out", str(tmp_path)]
    first = CliRunner().invoke(main, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert "[replay-trace] task 1/1" in first.output and "[evolutionary] task 1/1" in first.output
    (artifact,) = list_artifacts(tmp_path)
    manifest = artifact.manifest
    assert manifest.tuned and manifest.tuned_functions > 0
    assert manifest.tuning["tasks_tuned_now"] == 1 and manifest.tuning["tasks_skipped_no_flops"] > 0
    db = tmp_path / "tuning" / artifact.target_key
    before = records(db)
    assert len(before) >= 2, "both rounds' trials are kept"

    second = CliRunner().invoke(main, args, catch_exceptions=False)
    assert second.exit_code == 0, second.output
    (artifact,) = list_artifacts(tmp_path)
    assert artifact.manifest.tuning["tasks_skipped_done"] == 1
    assert artifact.manifest.tuning["trials_now"] == 0
    assert artifact.manifest.tuned_functions == manifest.tuned_functions
    after = records(db)
    assert after == before, "the resumed run added trials"
    assert 0 < artifact.manifest.tuning["kernel_sum_s"]
    assert artifact.manifest.tuning["tasks_with_records"] == len(artifact.manifest.tuning["top_tasks"]) == 1

    untuned_args = [a for a in args if a not in ("--tune",)]
    applied = CliRunner().invoke(main, untuned_args, catch_exceptions=False)
    assert applied.exit_code == 0, applied.output
    assert "applying the tuning records" in applied.output
    (artifact,) = list_artifacts(tmp_path)
    assert artifact.manifest.tuned_functions == manifest.tuned_functions
    assert artifact.manifest.tuning["trials_now"] == 0 and records(db) == before

    pipe = load_pipeline("SD1.5", "tiny", artifacts_root=tmp_path)
    req = dict(model_name="SD1.5", prompt="a red cube", height=64, width=64, steps=3, seed=2)
    tuned = pipe.generate(parse_request(req | {"backend": "auto"}))
    assert tuned.backends["text_encoder"] == "tvm"
    reference = pipe.generate(parse_request(req | {"backend": "torch"}))
    assert psnr(tuned.images[0], reference.images[0]) >= 40


def test_a_spent_budget_stops_tuning_and_still_builds(tmp_path):
    """A millisecond budget is spent before the first task (importing TVM's intrinsics alone takes longer)."""
    args = ["compile", "--model", "SD1.5", "--resolution", "64x64", "--components", "text_encoder", "--tune",
            "--tune-budget", "0.001s", "--trials-per-task", "2", "--tune-tasks", "2", "--out", str(tmp_path)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "tuning budget spent during the replay-trace round (0/2 tasks)" in result.output
    (artifact,) = list_artifacts(tmp_path)
    assert artifact.manifest.tuning["tasks_tuned_now"] == 0 and artifact.manifest.tuning["trials_now"] == 0


def test_bad_budget_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["compile", "--model", "SD1.5", "--resolution", "64x64", "--tune",
                                       "--tune-budget", "soon", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "error: tune_budget:" in result.output
