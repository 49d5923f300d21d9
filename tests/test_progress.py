"""Progress lines of long loops: every `every` seconds, with counts, rates and an ETA."""

from __future__ import annotations

import logging

from align2llava.progress import Progress, duration


def test_progress_logs_rates_and_eta_at_its_interval(caplog):
    now = [0.0]
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        p = Progress(40, "train question RM", "steps", log, every=30.0, bar=False, clock=lambda: now[0])
        for _ in range(10):  # 10 steps in 20 s: no line yet
            now[0] += 2.0
            p.update(1, pairs=16, tok=2000)
        assert caplog.messages == []
        now[0] += 10.0
        p.status = "loss 0.412"
        p.update(1, pairs=16, tok=2000)  # 11 steps in 30 s
        assert caplog.messages == [
            "train question RM: 11/40 steps (28%) in 30 s, 0.367 steps/s, 5.87 pairs/s, 733 tok/s, ETA 1m19s, loss 0.412"]
        for _ in range(29):
            now[0] += 1.5
            p.update(1, pairs=16, tok=2000)
        p.close()
    assert len(caplog.messages) == 2 + 1  # one more at 60 s, and the last line
    assert caplog.messages[1].startswith("train question RM: 31/40 steps (78%) in 1m00s, ")
    assert caplog.messages[-1].startswith("train question RM: 40/40 steps (100%) in 1m14s, ")
    assert "ETA" not in caplog.messages[-1] and caplog.messages[-1].endswith("(done)")


def test_short_loops_stay_quiet_and_resumed_runs_count_from_where_they_were(caplog):
    now = [0.0]
    with caplog.at_level(logging.INFO):
        with Progress(5, "score", "items", every=30.0, bar=False, clock=lambda: now[0]) as p:
            p.update(5)
        assert caplog.messages == []
        p = Progress(100, "finetune", "steps", every=0.0, bar=False, initial=50, clock=lambda: now[0])
        now[0] += 10.0
        p.update(10)
    assert caplog.messages[-1] == "finetune: 60/100 steps (60%) in 10 s, 1 steps/s, ETA 40 s"


def test_duration():
    assert [duration(s) for s in (0.4, 59.6, 61, 3599, 3600, 7384)] == ["0 s", "1m00s", "1m01s", "59m59s",
                                                                        "1h00m", "2h03m"]
