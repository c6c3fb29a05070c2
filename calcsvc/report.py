"""Draw a demo's timeline as a picture, for readers without Grafana.

The picture has two rows sharing one time axis: the breaker's state, with the
times the server was down shaded, and every call as a mark in the row of its
outcome. It needs matplotlib: ``pip install 'calcsvc[report]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib as mpl

mpl.use("Agg")  # draw to files only; no display is needed or wanted

import matplotlib.pyplot as plt

from calcsvc.breaker import OUTCOMES, STATES

if TYPE_CHECKING:
    from pathlib import Path

    from matplotlib.axes import Axes

    from calcsvc.demo import Timeline

STATE_COLOURS = {"closed": "#2e7d32", "half_open": "#f9a825", "open": "#c62828"}
OUTCOME_COLOURS = {
    "success": "#2e7d32",
    "failure": "#c62828",
    "ignored": "#757575",
    "rejected": "#ef6c00",
}


def _shade_outages(axes: Axes, timeline: Timeline) -> None:
    down_since: float | None = None
    for offset, up in [*timeline.server, (timeline.end, True)]:
        if not up and down_since is None:
            down_since = offset
        elif up and down_since is not None:
            axes.axvspan(down_since, offset, color="#ffcdd2", zorder=0)
            down_since = None


def draw(timeline: Timeline, path: Path) -> None:
    """Draw ``timeline`` into the PNG file at ``path``."""
    figure, (state_axes, call_axes) = plt.subplots(
        2, 1, sharex=True, figsize=(10, 5), height_ratios=(1, 1.2)
    )
    levels = {state: level for level, state in enumerate(STATES)}

    times = [offset for offset, _ in timeline.states] + [timeline.end]
    values = [levels[state] for _, state in timeline.states]
    state_axes.stairs(values, times, baseline=None, color="#424242", linewidth=1.5)
    for offset, state in timeline.states:
        state_axes.scatter(
            offset, levels[state], color=STATE_COLOURS[state], s=30, zorder=3
        )
    _shade_outages(state_axes, timeline)
    state_axes.set_yticks(range(len(STATES)), STATES)
    state_axes.set_ylim(-0.5, len(STATES) - 0.5)
    state_axes.set_title("Breaker state (shaded: server down)", loc="left")

    rows = {outcome: row for row, outcome in enumerate(OUTCOMES)}
    for outcome in OUTCOMES:
        offsets = [offset for offset, seen in timeline.calls if seen == outcome]
        call_axes.scatter(
            offsets,
            [rows[outcome]] * len(offsets),
            marker="|",
            s=200,
            color=OUTCOME_COLOURS[outcome],
        )
    _shade_outages(call_axes, timeline)
    call_axes.set_yticks(range(len(OUTCOMES)), OUTCOMES)
    call_axes.set_ylim(-0.5, len(OUTCOMES) - 0.5)
    call_axes.set_title("Calls by outcome", loc="left")
    call_axes.set_xlabel("seconds since the demo began")
    call_axes.set_xlim(0, max(timeline.end, 1.0))

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
