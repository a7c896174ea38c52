from __future__ import annotations

import threading

import pytest

from kvruntime.errors import KVRuntimeError, Overloaded
from kvruntime.scheduler import TurnQueue


def test_turns_run_one_at_a_time_in_submission_order() -> None:
    q = TurnQueue(max_queue=100)
    seen: list[int] = []
    active = [0]
    overlap = [False]

    def turn(i: int) -> int:
        def run(_wait: float) -> int:
            active[0] += 1
            overlap[0] |= active[0] > 1
            seen.append(i)
            active[0] -= 1
            return i * i

        return q.submit(run).result()  # type: ignore[no-any-return]

    futures = [q.submit(lambda _w, i=i: (seen.append(i), i)[1]) for i in range(20)]
    assert [f.result() for f in futures] == list(range(20))
    assert seen == list(range(20))
    threads = [threading.Thread(target=turn, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap[0]
    q.close()


def test_full_queue_raises_overloaded_and_recovers() -> None:
    q = TurnQueue(max_queue=2)
    gate = threading.Event()
    first = q.submit(lambda _w: gate.wait(10))
    second = q.submit(lambda _w: 2)
    with pytest.raises(Overloaded, match="2 turns are already queued"):
        q.submit(lambda _w: 3)
    gate.set()
    assert first.result() is True and second.result() == 2
    assert q.submit(lambda _w: 4).result() == 4  # slots were released
    q.close()
    with pytest.raises(KVRuntimeError, match="closed"):
        q.submit(lambda _w: 5)


def test_queue_wait_is_measured_with_the_injected_clock() -> None:
    ticks = iter([10.0, 12.5])
    q = TurnQueue(max_queue=1, clock=lambda: next(ticks))
    assert q.submit(lambda wait: wait).result() == 2.5
    q.close()
