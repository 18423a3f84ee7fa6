"""daemon.ticks: periodic duties wake on one grid of the monotonic clock, so that an idle daemon wakes once for all."""

from __future__ import annotations

import pytest

from daemon import ticks


@pytest.mark.parametrize(("now", "period", "wait"), [
    (100.0, 5.0, 5.0),  # on a grid point: the next one
    (101.0, 5.0, 4.0),
    (103.9, 5.0, 6.1),  # the next point is nearer than a quarter period: the one after
    (99.999, 5.0, 5.001),  # a timer that fired a hair early does not fire again at once
    (14.0, 15.0, 16.0),
])
def test_the_next_grid_point_at_least_a_quarter_period_away(monkeypatch: pytest.MonkeyPatch, now: float,
                                                            period: float, wait: float) -> None:
    monkeypatch.setattr(ticks.time, "monotonic", lambda: now)
    assert ticks.until_next(period) == pytest.approx(wait)


def test_duties_whose_periods_divide_one_another_wake_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease every 5 s and the heartbeats every 15 s, whatever their own work took: every heartbeat is at a
    moment the lease wakes anyway."""
    clock = {"now": 1234.567}
    monkeypatch.setattr(ticks.time, "monotonic", lambda: clock["now"])

    def wakes(period: float, work: float, count: int) -> set[float]:
        clock["now"], seen = 1234.567, set()
        for _ in range(count):
            clock["now"] += ticks.until_next(period)
            seen.add(round(clock["now"], 6))
            clock["now"] += work  # the duty's own run time
        return seen

    lease, heartbeats = wakes(5.0, 0.03, 60), wakes(15.0, 0.4, 20)
    assert heartbeats <= lease
