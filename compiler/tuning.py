"""MetaSchedule tuning that applies: one shared database, a wall-time budget, resumable, counted.

Tasks are the fused TIR functions of the Relax module that `tvm.compile` will build, so the records
found afterwards by `MetaScheduleApplyDatabase` are keyed by exactly those functions. Builds run in this
process (MetaSchedule's default builder starts a fresh worker pool per batch, ~30 s here), the runner's
pool is started once, and tasks are tuned heaviest first (FLOPs x occurrences) until the budget is spent.
Pure data-movement tasks (no arithmetic) are skipped. A workload that already has enough records in the
database is never tuned again, whichever model, resolution or component it came from.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class TuningReport:
    """What tuning did for one module and what the build got from it."""

    tasks_total: int
    tasks_tuned_now: int
    tasks_skipped_done: int
    tasks_skipped_no_flops: int
    trials_now: int
    seconds: float
    scheduled_functions: int
    total_functions: int


def parse_budget(text: str) -> float:
    """'45m', '90s', '1h', '1h30m' or plain seconds -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms]?)", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise ValueError(f"budget must look like 45m, 90s or 1h30m (got {text!r})")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)


def _in_process_builder():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        """Builds candidates in this process: no worker start-up per batch."""

        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(item.mod, item.target, None)), None))
                except Exception as exc:  # a candidate that fails to build is reported to the tuner
                    results.append(BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

    return InProcessBuilder()


def open_database(folder: Path):
    """The JSON tuning database in `folder` (created if missing), shared by every tuning run."""
    from tvm.s_tir import meta_schedule as ms

    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(str(folder / "database_workload.json"),
                                    str(folder / "database_tuning_record.json"), allow_missing=True)


def _records(database, task_mod) -> int:
    if not database.has_workload(task_mod):
        return 0
    return len(database.get_top_k(database.commit_workload(task_mod), 1 << 20))


def _flops(task) -> float:
    import tvm

    try:
        return float(tvm.s_tir.analysis.estimate_tir_flops(task.dispatched[0]))
    except Exception:  # functions the estimator cannot analyse count as data movement
        return 0.0


def count_scheduled(mod) -> tuple[int, int]:
    """(functions that carry a tuned schedule, all TIR functions) of a module."""
    import tvm

    funcs = [mod[gv] for gv in mod.get_global_vars() if isinstance(mod[gv], tvm.tirx.PrimFunc)]
    scheduled = sum(1 for f in funcs if f.attrs is not None and f.attrs.get("tirx.is_scheduled", None))
    return scheduled, len(funcs)


def tune_and_apply(fused: Any, target: Any, db_folder: Path, budget_s: float, trials_per_task: int,
                   max_tasks: int | None = None, log: Callable[[str], None] = print) -> tuple[Any, TuningReport]:
    """Tune the fused module's tasks within the budget, then apply every matching record to it."""
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    start = time.perf_counter()
    database = open_database(db_folder)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    weighted = sorted(((_flops(t) * t.weight, t) for t in tasks), key=lambda x: -x[0])
    no_flops = sum(1 for w, _ in weighted if w <= 0)
    todo = [t for w, t in weighted if w > 0][:max_tasks]
    runner = ms.runner.LocalRunner(timeout_sec=120,
                                   evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=0))
    builder = _in_process_builder()
    tuned = done_before = trials = 0
    for i, task in enumerate(todo, 1):
        have = _records(database, task.dispatched[0])
        if have >= trials_per_task:
            done_before += 1
            continue
        left = budget_s - (time.perf_counter() - start)
        if left <= 0:
            log(f"  tuning budget spent: {i - 1}/{len(todo)} tasks looked at")
            break
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts([task], work_dir=str(db_folder))
        want = trials_per_task - have
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(db_folder), max_trials_global=want,
                      max_trials_per_task=want, num_trials_per_iter=min(want, 16), builder=builder, runner=runner,
                      database=database)
        trials += want
        tuned += 1
        best = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
        latency = f"{float(best[0].run_secs[0]) * 1e6:.1f} us" if best and best[0].run_secs else "no valid run"
        log(f"  task {i}/{len(todo)} {task.task_name}: best {latency}; "
            f"{max(budget_s - (time.perf_counter() - start), 0):.0f} s left")
    with target, database:
        applied = relax.transform.MetaScheduleApplyDatabase()(fused)
    scheduled, total = count_scheduled(applied)
    report = TuningReport(len(tasks), tuned, done_before, no_flops, trials, round(time.perf_counter() - start, 1),
                          scheduled, total)
    with_records = sum(1 for _, t in weighted if _records(database, t.dispatched[0]) > 0)
    if with_records and not scheduled:
        raise RuntimeError(f"the tuning database has records for {with_records} of this module's workloads but "
                           "none was applied: the build would be silently untuned")
    return applied, report
