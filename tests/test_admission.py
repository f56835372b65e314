"""Admission: a slot stays taken until the work itself ends, not when its caller stops waiting."""

import asyncio
import threading

from sdaot.runtime.serve.admission import Admission


def test_a_timed_out_request_keeps_its_slot_until_the_worker_really_finishes():
    depth: list[int] = []
    admission = Admission(workers=1, queue_size=0, on_change=depth.append)
    started, release = threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        release.wait(60)

    try:
        running = admission.submit(work)
        assert running is not None and started.wait(60)

        async def wait_briefly():
            await asyncio.wait_for(asyncio.wrap_future(running), timeout=0.05)

        try:
            asyncio.run(wait_briefly())
            raise AssertionError("the work ended before it was released")
        except asyncio.TimeoutError:
            pass
        assert admission.submit(print) is None, "the caller gave up, but the worker is still busy"
        assert admission.admitted == 1
        release.set()
        running.result(timeout=60)
        follow_up = admission.submit(lambda: "done")
        assert follow_up is not None and follow_up.result(timeout=60) == "done"
    finally:
        release.set()
        admission.shutdown()
    assert admission.admitted == 0 and depth[-1] == 0 and max(depth) == 1


def test_queued_work_counts_and_every_slot_comes_back():
    admission = Admission(workers=1, queue_size=2)
    gate = threading.Event()
    futures = [admission.submit(gate.wait, 60) for _ in range(3)]
    assert all(f is not None for f in futures) and admission.submit(print) is None
    gate.set()
    for f in futures:
        f.result(timeout=60)
    admission.shutdown()
    assert admission.admitted == 0
