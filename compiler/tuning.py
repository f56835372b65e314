"""MetaSchedule tuning that applies: one shared database, a wall-time budget, resumable, counted.

Tasks are the fused TIR functions of the Relax module that `tvm.compile` will build, so the records
found afterwards by `MetaScheduleApplyDatabase` are keyed by exactly those functions. Builds run in this
process (MetaSchedule's default builder starts a fresh worker pool per batch, ~30 s here), the runner's
pool is started once, and tasks are tuned heaviest first (FLOPs x occurrences) until the budget is spent.
Pure data-movement tasks (no arithmetic) are skipped, and so are kernels that already carry a schedule
(attentions, convolutions and matmuls on CPUs: kernels.RULES_BEFORE_TUNING). Candidates are timed with
as many threads as the built module will run with (threads.py). A workload that already has enough records in the
database is never tuned again, whichever model, resolution or component it came from.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdaot.runtime.threads import use_all_cores

BREADTH_TRIALS = 8
TOP_TASKS = 15


@dataclass
class TuningReport:
    """What tuning did for one module and what the build got from it."""

    tasks_total: int
    tasks_tuned_now: int
    tasks_skipped_done: int
    tasks_skipped_no_flops: int
    tasks_skipped_scheduled: int
    trials_now: int
    seconds: float
    scheduled_functions: int
    total_functions: int
    tasks_with_records: int = 0
    kernel_sum_s: float = 0.0
    top_tasks: list[dict] = field(default_factory=list)
    threads: int = 1


@dataclass
class TuningOptions:
    """How a build tunes: database folder, wall-time budget (0: apply the records only), trials per task;
    `work_dir`, when set, is a private copy of the database that this build tunes into and applies, merged
    back into `database` afterwards (`merge_work_dirs`): one per Ray task, so that builds on different nodes
    never write one file at once."""

    database: Path
    budget_s: float
    trials_per_task: int = 64
    max_tasks: int | None = None
    work_dir: Path | None = None

    @property
    def tunes_in(self) -> Path:
        """The database folder this build reads and writes."""
        return self.work_dir or self.database


def tuning_options(database: Path, tune: bool, budget: str, trials_per_task: int, max_tasks: int | None,
                   target_kind: str, log: Callable[[str], None] = print) -> TuningOptions | None:
    """What `sdaot compile`'s flags ask for: tune within `budget` (--tune), else apply the records already in
    `database` to CPU builds, else none.
    Bad flag values are InvalidRequestError naming the flag."""
    from sdaot.runtime.errors import InvalidRequestError

    if tune:
        try:
            seconds = parse_budget(budget)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="tune_budget") from exc
        if trials_per_task < 1:
            raise InvalidRequestError("must be at least 1", param="trials_per_task")
        return TuningOptions(database, seconds, trials_per_task, max_tasks)
    if (database / "database_tuning_record.json").is_file() and target_kind == "llvm":
        log(f"applying the tuning records in {database} (no new tuning without --tune)")
        return TuningOptions(database, 0.0, trials_per_task, max_tasks)
    return None


def parse_budget(text: str) -> float:
    """'45m', '90s', '1h', '1h30m' or plain seconds -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms]?)", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise ValueError(f"budget must look like 45m, 90s or 1h30m (got {text!r})")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)


UNFINDABLE_SOURCES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>", "<string>", "<ast>")


def import_tensor_intrinsics() -> None:
    """Import `tvm.s_tir.tensor_intrin` (MetaSchedule's TuneContext needs it) in seconds rather than minutes.

    It parses about 500 TVMScript functions, each taking `inspect.stack()`, and `inspect.getmodule` scans all of
    `sys.modules` for every frame whose file it cannot map: import machinery and code compiled from strings.
    With torch and diffusers loaded (3,300 modules) the import took 136 s here, 58 s without them. Those frames
    have no module in any case, so they are entered as such for the duration of the import (8 s).
    """
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    added = [name for name in UNFINDABLE_SOURCES if name not in inspect.modulesbyfile]
    inspect.modulesbyfile.update(dict.fromkeys(added, ""))
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401  (registers the intrinsics)
    finally:
        for name in added:
            inspect.modulesbyfile.pop(name, None)


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


DATABASE_FILES = ("database_workload.json", "database_tuning_record.json", "attempts.json")


def private_copy(database: Path, work_dir: Path) -> None:
    """Start `work_dir` as a copy of the database, so that a build tuning there skips what is already tuned."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for name in DATABASE_FILES:
        if (database / name).is_file():
            shutil.copyfile(database / name, work_dir / name)


def merge_work_dirs(database: Path, work_dirs: list[Path]) -> int:
    """Commit to `database` every record of the work dirs that it lacks (all of them, not only the best, as a
    local run keeps them), take each workload's furthest tuning goal, and delete the work dirs. Returns the
    records added. Records are told apart by their JSON lines (workload hash and record), which needs no
    TVM objects for the many records a copy shares with the database."""
    from tvm.s_tir import meta_schedule as ms

    known = {_record_key(workload, record) for workload, record in _record_lines(database)}
    new: list[tuple[list, list]] = []
    attempts = TuningAttempts(database)
    for folder in work_dirs:
        for workload, record in _record_lines(folder):
            if _record_key(workload, record) not in known:
                known.add(_record_key(workload, record))
                new.append((workload, record))
        if folder.is_dir():
            for workload_hash, goal in TuningAttempts(folder).goals.items():
                attempts.goals[workload_hash] = max(goal, attempts.goals.get(workload_hash, 0))
    if new:
        shared = open_database(database)
        committed: dict[str, Any] = {}
        for workload, record in new:
            if workload[0] not in committed:
                committed[workload[0]] = shared.commit_workload(ms.database.Workload.from_json(workload).mod)
            shared.commit_tuning_record(ms.database.TuningRecord.from_json(record, committed[workload[0]]))
    attempts.save()
    for folder in work_dirs:
        shutil.rmtree(folder, ignore_errors=True)
    return len(new)


def _record_lines(folder: Path) -> list[tuple[list, list]]:
    """(workload JSON, record JSON) of every line of the JSON database in `folder` (none if it has no files)."""
    workload_file, record_file = (folder / name for name in DATABASE_FILES[:2])
    if not record_file.is_file():
        return []
    workloads = [json.loads(line) for line in workload_file.read_text().splitlines() if line.strip()]
    lines = (json.loads(line) for line in record_file.read_text().splitlines() if line.strip())
    return [(workloads[index], record) for index, record in lines]


def _record_key(workload: list, record: list) -> tuple[str, str]:
    """A record's identity across databases: its workload's structural hash and the record itself."""
    return workload[0], json.dumps(record, sort_keys=True)


def _records(database, task_mod) -> int:
    if not database.has_workload(task_mod):
        return 0
    return len(database.get_top_k(database.commit_workload(task_mod), 1 << 20))


class TuningAttempts:
    """How far each workload's tuning has been taken, kept beside the database (`attempts.json`).

    A small kernel's design space can hold fewer distinct schedules than the trials asked for, so its record
    count never reaches the goal; without this, every resumed run would tune it again.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / "attempts.json"
        self.goals: dict[str, int] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @staticmethod
    def _key(task) -> str:
        import tvm_ffi

        return str(tvm_ffi.structural_hash(task.dispatched[0]))

    def progress(self, database, task) -> int:
        """Trials this workload counts as done: its records, or the goal a finished run already aimed for."""
        return max(_records(database, task.dispatched[0]), self.goals.get(self._key(task), 0))

    def reached(self, task, goal: int) -> None:
        """Record that a run tuned this workload up to `goal` trials (written at once: runs can be killed)."""
        key = self._key(task)
        self.goals[key] = max(goal, self.goals.get(key, 0))
        self.save()

    def save(self) -> None:
        """Write the goals beside the database."""
        self.path.write_text(json.dumps(self.goals, indent=0, sort_keys=True))


def _flops(task) -> float:
    import tvm

    try:
        return float(tvm.s_tir.analysis.estimate_tir_flops(task.dispatched[0]))
    except Exception:  # functions the estimator cannot analyse count as data movement
        return 0.0


def _scheduled(task) -> bool:
    """Whether the task's kernel already has a schedule of its own (kernels.RULES_BEFORE_TUNING)."""
    return any(f.attrs is not None and f.attrs.get("tirx.is_scheduled", None)
               for f in task.dispatched[0].functions.values())


def count_scheduled(mod) -> tuple[int, int]:
    """(functions that carry a schedule, all TIR functions) of a module."""
    import tvm

    funcs = [mod[gv] for gv in mod.get_global_vars() if isinstance(mod[gv], tvm.tirx.PrimFunc)]
    scheduled = sum(1 for f in funcs if f.attrs is not None and f.attrs.get("tirx.is_scheduled", None))
    return scheduled, len(funcs)


def _tune_task(task, database, db_folder: Path, trials: int, strategy: str, builder, runner) -> None:
    from tvm.s_tir import meta_schedule as ms

    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts([task], work_dir=str(db_folder),
                                                                              strategy=strategy)
    ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(db_folder), max_trials_global=trials,
                  max_trials_per_task=trials, num_trials_per_iter=min(trials, 16), builder=builder, runner=runner,
                  database=database, cost_model="random" if strategy == "replay-trace" else "xgb")


def kernel_profile(database, tasks: list) -> list[dict]:
    """Where a call's time goes by the tuning records: best latency x occurrences per task, slowest first.

    Their sum is what the built module should take if the records applied (tasks without records are left
    out, so the sum is a lower bound when some kernels were never measured).
    """
    rows = []
    for task in tasks:
        best = database.get_top_k(database.commit_workload(task.dispatched[0]), 1) \
            if database.has_workload(task.dispatched[0]) else []
        if not best or not best[0].run_secs:
            continue
        latency = sum(float(x) for x in best[0].run_secs) / len(best[0].run_secs)
        rows.append({"task": task.task_name, "occurrences": int(task.weight), "gflop": round(_flops(task) / 1e9, 3),
                     "best_us": round(latency * 1e6, 1), "seconds_per_call": latency * task.weight,
                     "gflops_per_s": round(_flops(task) / latency / 1e9, 1)})
    return sorted(rows, key=lambda r: -r["seconds_per_call"])


def tune_and_apply(fused: Any, target: Any, db_folder: Path, budget_s: float, trials_per_task: int,
                   max_tasks: int | None = None, log: Callable[[str], None] = print) -> tuple[Any, TuningReport]:
    """Tune the fused module's tasks within the budget, then apply every matching record to it.

    Two rounds, heaviest task first in each: a cheap breadth round (a few random samples of each task's
    design space, no cost model) so that every kernel leaves the naive single-threaded loop nest, then the
    evolutionary search up to `trials_per_task` where the time goes. A budget of 0 only applies records.
    The breadth round's samples are independent, so a small design space can have one schedule measured
    twice (the committed database repeats a schedule 111 times in 1,930 records); a resumed run measures
    nothing for a task that has already reached its round's goal.
    """
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    start = time.perf_counter()
    import_tensor_intrinsics()
    database = open_database(db_folder)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    weighted = sorted(((_flops(t) * t.weight, t) for t in tasks if not _scheduled(t)), key=lambda x: -x[0])
    no_flops = sum(1 for w, _ in weighted if w <= 0)
    todo = [t for w, t in weighted if w > 0][:max_tasks]
    scheduled_before, _ = count_scheduled(fused)
    attempts = TuningAttempts(db_folder)
    done_before = sum(1 for t in todo if attempts.progress(database, t) >= trials_per_task)
    threads = use_all_cores()
    runner = ms.runner.LocalRunner(timeout_sec=120,
                                   evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=0))
    builder = _in_process_builder()
    rounds = [(max(1, min(BREADTH_TRIALS, trials_per_task // 2)), "replay-trace"), (trials_per_task, "evolutionary")]
    touched: set[str] = set()
    trials = 0
    for goal, strategy in rounds if budget_s > 0 else []:
        for i, task in enumerate(todo, 1):
            if attempts.progress(database, task) >= goal:
                continue
            if time.perf_counter() - start >= budget_s:
                log(f"  tuning budget spent during the {strategy} round ({i - 1}/{len(todo)} tasks)")
                break
            have = _records(database, task.dispatched[0])
            _tune_task(task, database, db_folder, goal - have, strategy, builder, runner)
            trials += _records(database, task.dispatched[0]) - have
            attempts.reached(task, goal)
            touched.add(task.task_name)
            best = database.get_top_k(database.commit_workload(task.dispatched[0]), 1)
            latency = f"{float(best[0].run_secs[0]) * 1e6:.1f} us" if best and best[0].run_secs else "no valid run"
            log(f"  [{strategy}] task {i}/{len(todo)} {task.task_name}: best {latency}; "
                f"{max(budget_s - (time.perf_counter() - start), 0):.0f} s left")
    with target, database:
        applied = relax.transform.MetaScheduleApplyDatabase()(fused)
    scheduled, total = count_scheduled(applied)
    scheduled -= scheduled_before
    profile = kernel_profile(database, [t for _, t in weighted])
    report = TuningReport(len(tasks), len(touched), done_before, no_flops, len(tasks) - len(weighted), trials,
                          round(time.perf_counter() - start, 1), scheduled, total, len(profile),
                          round(sum(p["seconds_per_call"] for p in profile), 6), profile[:TOP_TASKS], threads)
    with_records = len(profile)
    if with_records and not scheduled:
        raise RuntimeError(f"the tuning database has records for {with_records} of this module's workloads but "
                           "none was applied: the build would be silently untuned")
    return applied, report
