"""Progress lines off a terminal (progress.py): the pace in the unit a person reads."""

import pytest

import progress


@pytest.mark.parametrize("seconds_per_epoch, words", [(85.0, "85.0 s/epoch"), (0.5, "2.00 epochs/s"),
                                                      (0.01, "100 epochs/s")])
def test_a_slow_pace_is_given_as_seconds_per_unit(capsys, monkeypatch, seconds_per_epoch, words):
    now = [1000.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    bar = progress.Progress("flow prior", 10, "epoch", terminal=False, interval=0)
    now[0] += 2 * seconds_per_epoch
    bar.update(2)
    line = capsys.readouterr().out.strip()
    assert line.startswith("flow prior: 2/10 epochs (20%), " + words), line
    assert f"{progress.duration(8 * seconds_per_epoch)} left" in line
