"""The operator's view of a session: a rich table, plain log lines, or JSON.

``drift-coord serve`` refreshes :func:`render_table` live on a terminal and prints
:func:`render_lines` otherwise; ``drift-coord status`` and ``drift status`` render a
``SessionStatus`` fetched with an observer token the same way.

Every string shown comes from elsewhere (a node names itself and its device and says why it
wants to stop; a coordinator names its session) and goes through :func:`shown` first:
control and escape characters removed, cut to a length, and, for the table, rich markup
escaped. A new column passes its text through it too.
"""

from __future__ import annotations

import json
import math
import time

import msgspec
from rich.markup import escape
from rich.table import Table

from lightning_drift.protocol import NodeStatus, SessionStatus
from lightning_drift.text import clean_text
from lightning_drift.units import format_gib

CELL_MAX = 48  # characters of one table cell or key=value field
REASON_MAX = 200  # characters of a stop reason or a checkpoint path

STATE_STYLE = {
    "training": "green",
    "barrier": "cyan",
    "ready": "yellow",
    "joined": "yellow",
    "lost": "red",
    "left": "dim",
    "excluded": "red",
}


def shown(value: object, limit: int = CELL_MAX, *, markup: bool = False) -> str:
    """``value`` as text safe to show: no control or escape characters, at most ``limit``
    characters, and with ``markup`` its rich markup escaped (for a rich table)."""
    text = clean_text(value, limit)
    return escape(text) if markup else text


def _number(x: float, fmt: str) -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and math.isfinite(x) and x else "-"


def _vram(n: int) -> str:
    return format_gib(n) if n > 0 else "-"


def _used_peak(n: NodeStatus) -> str:
    if n.vram_used <= 0 and n.vram_peak <= 0:
        return "-"
    return f"{n.vram_used / 2**30:.1f}/{format_gib(max(n.vram_peak, n.vram_used))}"


def _loss(n: NodeStatus) -> str:
    if n.loss is None:
        return "-"
    return f"{n.loss:.4g}" if math.isfinite(n.loss) else str(n.loss)


def _node_label(n: NodeStatus) -> str:
    node = shown(n.node_id, 8)
    return f"{shown(n.name, 32)} ({node})" if n.name else node


def _title(st: SessionStatus) -> str:
    title = (
        f"session {shown(st.session_id, 32)} · {shown(st.state, 16)} · round {st.round} · "
        f"epoch {min(st.epoch + 1, st.epochs)}/{st.epochs} · {shown(st.aggregation, 16)}"
    )
    if st.data_plane == "sharded":
        title += f" · sharded data plane, {st.shards} shards"
    if st.stop_reason:
        title += f" · stopping early: {shown(st.stop_reason, REASON_MAX)}"
    return title


def _row(n: NodeStatus) -> list[str]:
    """The cells of one node's row, as plain text made safe by :func:`shown`."""
    return [
        _node_label(n),
        shown(n.device) or "-",
        _vram(n.vram_total),
        _number(n.share, "{:.1%}"),
        _number(n.samples_per_s, "{:.1f}"),
        _loss(n),
        _used_peak(n),
        str(n.round),
        _number(n.barrier_wait_s, "{:.1f}s"),
        shown(n.state, 16) + (" (asked to stop)" if n.stop_asked else ""),
    ]


COLUMNS = (
    "node",
    "device",
    "VRAM",
    "share",
    "samples/s",
    "loss",
    "VRAM used/peak",
    "round",
    "barrier wait",
    "state",
)
_RIGHT = ("share", "samples/s", "loss", "VRAM used/peak", "round", "seats", "data moved")
SHARDED_COLUMNS = ("seats", "data moved")  # added before "state" in a sharded session


def _sharded(n: NodeStatus) -> list[str]:
    """A sharded session's cells: the node's seats and the piece bytes it moved."""
    return [str(n.seats), f"{n.data_bytes / 2**20:.1f} MiB" if n.data_bytes else "-"]


def render_table(st: SessionStatus) -> Table:
    """One row per node: node, device, VRAM, share, samples/s, loss (its last report), VRAM
    used/peak (RAM for a CPU node), round, barrier wait, state."""
    caption = escape(shown(st.checkpoint, REASON_MAX)) if st.checkpoint else None
    table = Table(title=escape(_title(st)), caption=caption, expand=False)
    sharded = st.data_plane == "sharded"
    columns = [*COLUMNS[:-1], *SHARDED_COLUMNS, COLUMNS[-1]] if sharded else list(COLUMNS)
    for col in columns:
        table.add_column(col, justify="right" if col in _RIGHT else "left")
    for n in st.nodes:
        cells = _row(n)
        if sharded:
            cells[-1:-1] = _sharded(n)
        row = [escape(cell) for cell in cells]
        style = STATE_STYLE.get(n.state, "")
        row[-1] = f"[{style}]{row[-1]}[/]" if style else row[-1]
        table.add_row(*row)
    return table


def render_lines(st: SessionStatus, now: float | None = None) -> list[str]:
    """The same content as plain ``key=value`` log lines (for logs and non-terminals)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now if now is not None else time.time()))
    head = (
        f"{stamp} session={shown(st.session_id, 32)} state={shown(st.state, 16)} "
        f"round={st.round} epoch={min(st.epoch + 1, st.epochs)}/{st.epochs} "
        f"aggregation={shown(st.aggregation, 16)} nodes={len(st.nodes)}"
    )
    if st.data_plane == "sharded":
        head += f" data_plane=sharded shards={st.shards} coordinator_bytes={st.coordinator_bytes}"
    if st.stop_reason:
        head += f" stop={_token(st.stop_reason, REASON_MAX)}"
    out = [head]
    for n in st.nodes:
        node, device, vram, share, pace, loss, used_peak, arrived_round, wait, _ = _row(n)
        out.append(
            f"{stamp}   node={_token(node)} device={_token(device)} "
            f"vram={vram.replace(' ', '')} share={share} samples_per_s={pace} loss={loss} "
            f"vram_used_peak={used_peak.replace(' ', '')} round={arrived_round} "
            f"barrier_wait={wait} state={_token(n.state, 16)}"
            + (" stop_asked=yes" if n.stop_asked else "")
            + (f" seats={n.seats} data_bytes={n.data_bytes}" if st.data_plane == "sharded" else "")
        )
    return out


def _token(text: str, limit: int = CELL_MAX) -> str:
    """One ``key=value`` value: safe to show, no spaces."""
    return shown(text, limit).replace(" ", "_")


def render_json(st: SessionStatus) -> str:
    """The status as indented JSON (the wire form of SessionStatus)."""
    return json.dumps(msgspec.to_builtins(st), indent=2, sort_keys=True)


__all__ = ["COLUMNS", "render_json", "render_lines", "render_table", "shown"]
