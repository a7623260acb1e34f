"""utils/progress.py: on a terminal a tqdm bar, in a log file a line at 25/50/75/100% and at most every 30 s."""

import logging
import sys

import pytest
from tqdm.auto import tqdm

from utils import progress as progress_module
from utils.progress import ProgressLog, format_duration, progress


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Lines(logging.Handler):
    def __init__(self, bar, clock):
        super().__init__()
        self.bar, self.clock, self.lines = bar, clock, []

    def emit(self, record):
        self.lines.append((self.bar.done, self.clock.now - 1000.0, record.getMessage()))


def _run(total, seconds_per_item, interval=30.0, step=1):
    """Feed `total` items, `step` at a time, each taking `seconds_per_item`; (done, time, text) of every line."""
    clock, log = FakeClock(), logging.getLogger(f"test.progress.{total}.{seconds_per_item}.{step}")
    log.setLevel(logging.INFO)
    bar = ProgressLog(total=total, desc="Caching image features", logger=log, interval=interval, clock=clock)
    handler = Lines(bar, clock)
    log.addHandler(handler)
    for _ in range(0, total, step):
        clock.now += seconds_per_item * step
        bar.update(step)
    log.removeHandler(handler)
    return handler.lines


def test_quick_work_logs_the_quarters_only():
    lines = _run(100, seconds_per_item=0.1)  # 10 s in all: never 30 s without a line
    assert [done for done, _, _ in lines] == [25, 50, 75, 100]
    assert lines[0][2] == "Caching image features: 25/100 images (25%), 10 images/s, about 8 s left"
    assert lines[-1][2] == "Caching image features: 100/100 images (100%), 10 images/s, done in 10 s"


def test_fast_work_states_its_rate_without_an_exponent():
    lines = _run(100, seconds_per_item=0.0008)  # 1,250 images/s: the tiny test models fill caches this fast
    assert lines[-1][2] == "Caching image features: 100/100 images (100%), 1250 images/s, done in 0 s"


def test_slow_work_logs_at_most_every_interval_and_at_each_quarter():
    lines = _run(100, seconds_per_item=2.0)  # 200 s in all
    done = [d for d, _, _ in lines]
    assert done == [15, 25, 40, 50, 65, 75, 90, 100]  # 30 s after the previous line, and at the quarters
    times = [t for _, t, _ in lines]
    quarters = {25, 50, 75, 100}
    for (d0, t0, _), (d1, t1, _) in zip(lines, lines[1:]):
        assert t1 - t0 <= 30.0  # never longer silent than the interval (items take 2 s here)
        if d1 not in quarters:
            assert t1 - t0 >= 30.0  # and never more often, except at a quarter
    assert lines[0][2] == "Caching image features: 15/100 images (15%), 0.5 images/s, about 2 min 50 s left"
    assert times[-1] == 200.0


def test_big_batches_crossing_two_quarters_log_once_and_the_interval_is_injectable():
    lines = _run(100, seconds_per_item=0.01, step=60)  # 0..60 crosses 25 and 50; 60..120 crosses 75 and 100
    assert [done for done, _, _ in lines] == [60, 120]
    lines = _run(10, seconds_per_item=1.0, interval=2.0)
    assert [done for done, _, _ in lines] == [2, 3, 5, 7, 8, 10]  # every 2 s, and 25/50/75/100% (2.5 -> 3, 7.5 -> 8)


def test_unknown_total_and_iterating(caplog):
    clock = FakeClock()
    log = ProgressLog(total=None, desc="Captioning", logger=logging.getLogger("t"), interval=5.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(12):
            clock.now += 1.0
            log.update(1)
    assert [r.getMessage() for r in caplog.records] == ["Captioning: 5 images, 1 images/s",
                                                         "Captioning: 10 images, 1 images/s"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="t"):
        items = list(ProgressLog(range(4), desc="Embedding", unit="batches", logger=logging.getLogger("t"), clock=clock))
    assert items == [0, 1, 2, 3] and len(caplog.records) == 4  # each item a quarter


def test_terminal_gets_tqdm_and_a_log_file_gets_lines(monkeypatch, caplog):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress(total=3, desc="Captioning")
    assert isinstance(bar, tqdm) and not bar.disable
    inner = progress(total=3, desc="Validation captioning")  # under another bar: tqdm removes it when done
    assert inner.pos != 0 and not inner.leave
    inner.close()
    bar.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="x"), progress(total=2, desc="Captioning", logger=logging.getLogger("x")) as bar:
        assert isinstance(bar, ProgressLog)
        bar.update(2)
    assert caplog.records[0].getMessage().startswith("Captioning: 2/2 images (100%)")
    assert progress(total=2, desc="Captioning", disable=True).disable
    assert progress_module.LOG_INTERVAL_S == 30.0


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (42, "42 s"), (185, "3 min 5 s"), (8040, "2 h 14 min")])
def test_durations_read_like_a_person_says_them(seconds, text):
    assert format_duration(seconds) == text
