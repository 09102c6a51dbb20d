"""The operator's view of a session: a rich table, plain log lines, or JSON.

``drift-coord serve`` refreshes :func:`render_table` live on a terminal and prints
:func:`render_lines` otherwise; ``drift-coord status`` and ``drift status`` render a
``SessionStatus`` fetched with an observer token the same way.
"""

from __future__ import annotations

import json
import time

import msgspec
from rich.table import Table

from lightning_drift.protocol import NodeStatus, SessionStatus
from lightning_drift.units import format_gib

STATE_STYLE = {
    "training": "green",
    "barrier": "cyan",
    "ready": "yellow",
    "joined": "yellow",
    "lost": "red",
    "left": "dim",
}


def _vram(n: int) -> str:
    return format_gib(n) if n > 0 else "-"


def _node_label(n: NodeStatus) -> str:
    return f"{n.name} ({n.node_id[:8]})" if n.name else n.node_id[:8]


def _title(st: SessionStatus) -> str:
    return (
        f"session {st.session_id} · {st.state} · round {st.round} · epoch "
        f"{min(st.epoch + 1, st.epochs)}/{st.epochs} · {st.aggregation}"
    )


def _row(n: NodeStatus) -> list[str]:
    return [
        _node_label(n),
        n.device or "-",
        _vram(n.vram_total),
        f"{n.share:.1%}" if n.share else "-",
        f"{n.samples_per_s:.1f}" if n.samples_per_s else "-",
        str(n.round),
        f"{n.barrier_wait_s:.1f}s" if n.barrier_wait_s else "-",
        n.state,
    ]


COLUMNS = ("node", "device", "VRAM", "share", "samples/s", "round", "barrier wait", "state")


def render_table(st: SessionStatus) -> Table:
    """One row per node: node, device, VRAM, share, samples/s, round, barrier wait, state."""
    table = Table(title=_title(st), caption=st.checkpoint or None, expand=False)
    for col in COLUMNS:
        table.add_column(col, justify="right" if col in ("share", "samples/s", "round") else "left")
    for n in st.nodes:
        row = _row(n)
        style = STATE_STYLE.get(n.state, "")
        row[-1] = f"[{style}]{n.state}[/]" if style else n.state
        table.add_row(*row)
    return table


def render_lines(st: SessionStatus, now: float | None = None) -> list[str]:
    """The same content as plain ``key=value`` log lines (for logs and non-terminals)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now if now is not None else time.time()))
    out = [
        f"{stamp} session={st.session_id} state={st.state} round={st.round} "
        f"epoch={min(st.epoch + 1, st.epochs)}/{st.epochs} aggregation={st.aggregation} nodes={len(st.nodes)}"
    ]
    for n in st.nodes:
        node, device, vram, share, rate, arrived_round, wait, state = _row(n)
        out.append(
            f"{stamp}   node={node.replace(' ', '_')} device={device.replace(' ', '_')} "
            f"vram={vram.replace(' ', '')} share={share} samples_per_s={rate} round={arrived_round} "
            f"barrier_wait={wait} state={state}"
        )
    return out


def render_json(st: SessionStatus) -> str:
    """The status as indented JSON (the wire form of SessionStatus)."""
    return json.dumps(msgspec.to_builtins(st), indent=2, sort_keys=True)


__all__ = ["COLUMNS", "render_json", "render_lines", "render_table"]
