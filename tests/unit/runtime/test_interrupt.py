"""SIGINT and SIGTERM during a batch: the guard notes the request (the batch in flight finishes), a
second signal stops at once, ``check`` leaves with 130 or 143, and the handlers that were there before
are back when the guard is left, however it is left."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from batchcam.runtime.interrupt import Interrupted, InterruptGuard


@pytest.fixture
def own_handlers():
    """Handlers of this test's own for SIGINT and SIGTERM, restored afterwards."""
    def mine(signum, frame):
        raise AssertionError(f"the test's own handler got {signum}")

    before = {signum: signal.signal(signum, mine) for signum in InterruptGuard.SIGNALS}
    yield mine
    for signum, handler in before.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum, code, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_during_a_batch_lets_the_batch_finish_and_stops_at_the_check(signum, code, name, own_handlers):
    finished = []
    with InterruptGuard() as guard:
        for batch in range(5):
            if batch == 2:
                os.kill(os.getpid(), signum)    # arrives while batch 2 is in flight
            finished.append(batch)              # the batch in flight still finishes
            if guard.requested:
                break
        with pytest.raises(Interrupted) as stopped:
            guard.check()
    assert finished == [0, 1, 2]
    assert stopped.value.exit_code == code and stopped.value.signum == signum
    assert str(stopped.value) == f"stopped by {name}; finished batches are saved and the next run resumes from them"
    assert all(signal.getsignal(s) is own_handlers for s in InterruptGuard.SIGNALS)


def test_a_second_signal_stops_at_once(own_handlers):
    with pytest.raises(KeyboardInterrupt), InterruptGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested
        os.kill(os.getpid(), signal.SIGINT)
    assert all(signal.getsignal(s) is own_handlers for s in InterruptGuard.SIGNALS)


def test_the_handlers_are_restored_when_the_block_fails(own_handlers):
    with pytest.raises(ValueError), InterruptGuard():
        assert all(signal.getsignal(s) is not own_handlers for s in InterruptGuard.SIGNALS)
        raise ValueError("a batch failed")
    assert all(signal.getsignal(s) is own_handlers for s in InterruptGuard.SIGNALS)


def test_without_a_signal_nothing_is_requested_and_check_passes(own_handlers):
    with InterruptGuard() as guard:
        guard.check()
        assert not guard.requested and guard.signum is None


def test_off_the_main_thread_the_guard_changes_no_handler(own_handlers):
    seen = []

    def in_thread() -> None:
        with InterruptGuard() as guard:
            seen.append([signal.getsignal(s) for s in InterruptGuard.SIGNALS])
            guard.check()

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [[own_handlers, own_handlers]]


def test_a_stop_after_publishing_says_the_report_was_published():
    assert str(Interrupted(signal.SIGTERM, published=True)) == "stopped by SIGTERM after publishing this run's report"
