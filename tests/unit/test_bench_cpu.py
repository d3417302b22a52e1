"""bench.approval's CPU helpers: `--cpus` parsing, and the main thread's share of a process's CPU."""

from __future__ import annotations

import os
import threading
import time

import pytest

from bench.approval import parse_cpus
from bench.common import main_thread_cpu_s, proc_cpu_s


@pytest.mark.parametrize(
    ("text", "cpus"), [("0", {0}), ("0,1", {0, 1}), ("0-3", {0, 1, 2, 3}), (" 2 , 0-1", {0, 1, 2})]
)
def test_cpus_are_numbers_lists_and_ranges(text: str, cpus: set[int]) -> None:
    assert parse_cpus(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "0,", "1-x", "-1", "0;1"])
def test_anything_else_is_a_value_error_naming_the_option(text: str) -> None:
    with pytest.raises(ValueError, match="--cpus"):
        parse_cpus(text)


def _spin(seconds: float) -> None:
    # CPU time, not wall time: on a busy machine a thread may wait for a core.
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


def test_a_worker_threads_cpu_counts_for_the_process_not_for_its_main_thread() -> None:
    pid = os.getpid()
    process0, main0 = proc_cpu_s(pid), main_thread_cpu_s(pid)
    worker = threading.Thread(target=_spin, args=(0.3,))
    worker.start()
    worker.join()
    # The kernel counts in clock ticks (10 ms here); the worker's 0.3 s shows in the process only.
    assert proc_cpu_s(pid) - process0 >= 0.25
    assert main_thread_cpu_s(pid) - main0 < 0.15
    main1 = main_thread_cpu_s(pid)
    _spin(0.3)
    assert main_thread_cpu_s(pid) - main1 >= 0.25
