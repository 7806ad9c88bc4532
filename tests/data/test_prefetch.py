"""read_ahead: results in order, computed by a thread ahead of the caller, errors at their item, an early stop
waits for the call under way."""

from __future__ import annotations

import threading

import pytest

from rcnn.data.prefetch import read_ahead


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_results_come_in_order_whatever_the_depth(depth):
    assert list(read_ahead(lambda x: x * x, range(9), depth)) == [(x, x * x) for x in range(9)]
    assert list(read_ahead(lambda x: x, [], depth)) == []


def test_depth_zero_calls_in_the_callers_thread_and_otherwise_in_another():
    def where(_):
        return threading.current_thread() is threading.main_thread()

    assert all(main for _, main in read_ahead(where, range(3), 0))
    assert not any(main for _, main in read_ahead(where, range(3), 2))


def test_the_next_item_is_read_while_the_caller_holds_this_one_and_no_further_than_the_depth():
    started = {k: threading.Event() for k in range(6)}

    def fn(k):
        started[k].set()
        return k

    for k, _ in read_ahead(fn, range(6), 2):
        if k + 1 < 6:
            # Without a thread ahead of the caller, item k + 1 could not start before the caller asks for it.
            assert started[k + 1].wait(10), f"item {k + 1} was not read while the caller held item {k}"
        if k + 3 < 6:  # two items ahead at most: k + 3 is handed to the thread when the caller asks for k + 1
            assert not started[k + 3].is_set()


def test_an_error_is_raised_at_its_item_after_the_items_before_it():
    def fn(k):
        if k == 3:
            raise ValueError("image 3 is broken")
        return k

    got = []
    with pytest.raises(ValueError, match="image 3 is broken"):
        for k, _ in read_ahead(fn, range(6), 2):
            got.append(k)
    assert got == [0, 1, 2]


def test_closing_early_waits_for_the_call_under_way_and_starts_no_more():
    events: list[str] = []
    running, release = threading.Event(), threading.Event()

    def fn(k):
        events.append(f"start {k}")
        if k == 1:
            running.set()
            release.wait(10)  # still running when the caller stops
        events.append(f"end {k}")
        return k

    it = read_ahead(fn, range(100), 3)
    assert next(it) == (0, 0)
    assert running.wait(10)
    threading.Timer(0.2, release.set).start()
    it.close()  # returns only once item 1 has ended
    # Item 1 was under way and finished; items 2 and 3, waiting behind it, never started.
    assert events == ["start 0", "end 0", "start 1", "end 1"]
    snapshot = list(events)
    release.set()
    assert events == snapshot
