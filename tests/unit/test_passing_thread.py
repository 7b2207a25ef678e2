"""Loads run in a thread that ends with them, so the decoding thread stays the only long-lived one that computes."""

from __future__ import annotations

import threading

import pytest

from tunesmith.generation.passing_thread import in_passing_thread


def test_work_runs_in_a_thread_that_is_gone_afterwards_and_its_result_comes_back():
    seen = {}

    def work():
        seen["thread"] = threading.current_thread()
        return 42

    assert in_passing_thread(work) == 42
    assert seen["thread"] is not threading.current_thread()
    assert not seen["thread"].is_alive()


def test_an_error_in_the_work_is_raised_in_the_callers_thread():
    def work():
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        in_passing_thread(work)
