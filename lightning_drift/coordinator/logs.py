"""The session's log, written through Lightning's own logger classes.

After every completed round the coordinator logs one :class:`RoundRecord`: how many nodes
contributed, the losses they reported at the barrier, the samples, the round's time, the
barrier waits, the bytes, the aggregation, and per node its loss and rate. The metrics go to
one or more Lightning loggers (``CSVLogger`` by default, next to the checkpoints;
``TensorBoardLogger``, ``WandbLogger``, ``MLFlowLogger`` or any logger's class path when it is
installed), at step = the completed round, so a session's curves open in TensorBoard (or W&B,
MLflow) like any Lightning run's.

This is the one module of the coordinator that imports Lightning, and only lazily, in its
writer thread (:meth:`SessionLog.open`): the coordinator itself never needs Lightning, and
importing it takes seconds. A logger that cannot be made (not installed, bad arguments) is
reported and left out; logging never stops a session.

The log stays bounded whatever the nodes do: its size grows with the rounds, not with what
nodes call themselves or how many keys come and go. Per-node metrics are keyed by the node's
id, never by the name it chose (a rename would add columns, and a CSV logger rewrites its
whole file at every new column), and only the first :func:`node_column_cap` nodes of a
session get columns of their own (:class:`NodeColumns`); the round's totals count every
contributor.

:func:`round_metrics` (record → metric names and values) and :class:`NodeColumns` are pure;
:class:`SessionLog` does the I/O, one call at a time in its own thread, so the event loop
never waits for a disk.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_drift.protocol import BarrierSync

if TYPE_CHECKING:
    from lightning_drift.coordinator.session import RoundOutcome, Session

from lightning_drift.text import clean_text, short_id

log = logging.getLogger(__name__)

# The short names `--logger` accepts, and the class each stands for.
LOGGER_CLASSES: dict[str, str] = {
    "csv": "lightning.pytorch.loggers.CSVLogger",
    "tensorboard": "lightning.pytorch.loggers.TensorBoardLogger",
    "wandb": "lightning.pytorch.loggers.WandbLogger",
    "mlflow": "lightning.pytorch.loggers.MLFlowLogger",
}


@dataclass(frozen=True)
class NodeRound:
    """One contributor of a completed round, as the coordinator saw it."""

    node: str  # the node's id (its key, hex): what its columns are keyed by
    name: str  # the name it chose: said in the coordinator's log, never a metric's name
    samples: int  # samples since its previous barrier (its aggregation weight)
    loss: float | None  # the training loss it reported at the barrier
    samples_per_s: float  # its training pace this round (0: not measured)
    barrier_wait_s: float  # from its upload to the round's completion
    bytes_received: int  # the size of its upload


@dataclass(frozen=True)
class RoundRecord:
    """What one completed round is logged as."""

    completed_round: int
    epoch: int
    nodes: tuple[NodeRound, ...]  # the contributors, in arrival order
    live_nodes: int
    round_s: float  # from the round's opening to its checkpoint
    aggregation_s: float  # aggregating and writing the checkpoint
    bytes_received: int  # uploads of the round
    bytes_sent: int  # the new global weights, once per contributor
    finished: bool = False


# How many nodes, per node of --max-nodes, a session's log gives columns of their own.
COLUMN_NODES_PER_MAX_NODE = 2


def node_column_cap(max_nodes: int) -> int:
    """How many nodes get per-node columns in a session's log: twice ``max_nodes``, so every
    node live at once has its own and as many again may replace them over a long session.
    Node keys cost nothing under a shared token; past this, how often they come and go would
    decide the log's width, and with a CSV logger its size would grow with the square of the
    rounds."""
    return COLUMN_NODES_PER_MAX_NODE * max(1, max_nodes)


class NodeColumns:
    """Which nodes have per-node columns in the session's log, and each one's label.

    A node's label is its :func:`~lightning_drift.text.short_id` (a longer prefix of its id
    when another node already has that one), so a node that renames itself keeps its
    columns. The first ``cap`` nodes to contribute get a label for the whole log; a later
    node gets none and its per-node metrics are left out. :meth:`assign` reports what is new,
    so that each labelled node, and each node left out, is said once in the coordinator's
    log; it remembers the last ``cap`` nodes left out, so its memory is bounded as the log's
    width is.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.labels: dict[str, str] = {}  # node id -> label
        self._used: set[str] = set()
        self._told: dict[str, None] = {}  # nodes left out and already said, oldest first

    def assign(self, nodes: Sequence[str]) -> tuple[list[str], list[str]]:
        """Label the ``nodes`` of a round that have none while labels are left. Returns the
        nodes labelled now and the nodes left out that were not said yet."""
        labelled, left_out = [], []
        for node in nodes:
            if node in self.labels:
                continue
            if len(self.labels) < self.cap:
                # Ids are keys: a prefix long enough to differ exists; a node may grind
                # a key to share a short one, never the whole id.
                label = next((p for p in (short_id(node), node[:16]) if p not in self._used), node)
                self.labels[node] = label
                self._used.add(label)
                labelled.append(node)
            elif node not in self._told:
                self._told[node] = None
                if len(self._told) > self.cap:
                    del self._told[next(iter(self._told))]
                left_out.append(node)
        return labelled, left_out


def round_metrics(rec: RoundRecord, labels: Mapping[str, str]) -> dict[str, float]:
    """The metrics of one completed round (names as Lightning loggers show them).

    ``round/loss`` is the samples-weighted mean of the losses the contributors reported at
    the barrier (their last training loss; NaN when none reported one). Per-node metrics
    are ``node/<label>/...`` for the contributors ``labels`` (node id -> label) names; the
    others count in the round's totals and in ``round/nodes_omitted``."""
    samples = sum(n.samples for n in rec.nodes)
    reported = [(n.samples, n.loss) for n in rec.nodes if n.loss is not None]
    weight = sum(s for s, _ in reported)
    if reported and weight > 0:
        loss = sum(s * float(v) for s, v in reported) / weight
    elif reported:
        loss = sum(float(v) for _, v in reported) / len(reported)
    else:
        loss = math.nan
    out: dict[str, float] = {
        "epoch": float(rec.epoch),
        "round/nodes": float(len(rec.nodes)),
        "round/nodes_omitted": float(sum(1 for n in rec.nodes if n.node not in labels)),
        "round/live_nodes": float(rec.live_nodes),
        "round/samples": float(samples),
        "round/loss": loss,
        "round/seconds": rec.round_s,
        "round/aggregation_s": rec.aggregation_s,
        "round/barrier_wait_max_s": max((n.barrier_wait_s for n in rec.nodes), default=0.0),
        "round/bytes_received": float(rec.bytes_received),
        "round/bytes_sent": float(rec.bytes_sent),
    }
    for n in rec.nodes:
        if n.node not in labels:
            continue
        prefix = f"node/{labels[n.node]}"
        if n.loss is not None:
            out[f"{prefix}/loss"] = float(n.loss)
        out[f"{prefix}/samples"] = float(n.samples)
        out[f"{prefix}/samples_per_s"] = n.samples_per_s
        out[f"{prefix}/barrier_wait_s"] = n.barrier_wait_s
    return out


def round_record(
    session: Session,
    outcome: RoundOutcome,
    contributors: Sequence[tuple[str, float]],
    counted: Mapping[str, tuple[BarrierSync, int]],
    size: int,
    round_s: float,
    aggregation_s: float,
) -> RoundRecord:
    """What the session's log gets for the round that just completed: its ``contributors``
    (node, weight), each one's counted upload (its BarrierSync, bytes) and the weights'
    ``size`` sent back to each."""
    s = session
    nodes = []
    for node, weight in contributors:
        sync, nbytes = counted.get(node, (BarrierSync(round=outcome.completed_round), 0))
        m = s.members.get(node)
        # Its weight as the round took it (bounded, 0 for an upload that trained nothing),
        # never the samples it claimed.
        pace = weight / sync.train_seconds if sync.train_seconds > 0 else 0.0
        nodes.append(
            NodeRound(
                node=node,
                name=m.name if m else "",
                samples=int(weight),
                loss=sync.loss,
                samples_per_s=pace or s.paces.of(node).reported,
                barrier_wait_s=m.barrier_wait if m else 0.0,
                bytes_received=nbytes,
            )
        )
    return RoundRecord(
        completed_round=outcome.completed_round,
        epoch=outcome.epoch,
        nodes=tuple(nodes),
        live_nodes=len(s.live()),
        round_s=round_s,
        aggregation_s=aggregation_s,
        bytes_received=sum(n.bytes_received for n in nodes),
        bytes_sent=size * len(nodes),
        finished=outcome.finished,
    )


def logger_class_path(name: str) -> str:
    """The class path a ``--logger`` value names (a short name or a class path)."""
    return LOGGER_CLASSES.get(name, name)


def make_logger(name: str, save_dir: Path, run: str) -> Any:
    """A Lightning logger for ``name`` writing under ``save_dir / <name>``, run ``run``.

    Imports Lightning (and the logger's backend). The arguments a logger class takes among
    ``save_dir``, ``name``, ``experiment_name``, ``run_name``, ``project`` are given; the rest
    keep their defaults (W&B and MLflow read their own environment variables). Raises
    whatever the import or the constructor raises."""
    path = logger_class_path(name)
    module, _, cls_name = path.rpartition(".")
    cls: Callable[..., Any] = getattr(importlib.import_module(module), cls_name)
    short = next((k for k, v in LOGGER_CLASSES.items() if v == path), cls_name.lower())
    offered = {
        "save_dir": str(save_dir / short),
        "name": run,
        "experiment_name": run,
        "run_name": run,
        "project": "lightning-drift",
    }
    params = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in offered.items() if k in params})


class SessionLog:
    """The session's loggers, fed from the coordinator's event loop without blocking it.

    Every call is queued to one writer thread and returns at once; :meth:`close` waits for
    the queue. ``names``: the ``--logger`` values (``"none"`` alone: no logging);
    ``max_nodes``: the session's ``--max-nodes``, from which :func:`node_column_cap` bounds
    the nodes with columns of their own.
    """

    def __init__(
        self,
        names: Sequence[str],
        save_dir: Path,
        run: str,
        hparams: Mapping[str, Any] | None = None,
        *,
        max_nodes: int,
    ) -> None:
        self.names = [n for n in names if n != "none"]
        self.save_dir = Path(save_dir)
        self.run = run
        self.hparams = dict(hparams or {})
        self.columns = NodeColumns(node_column_cap(max_nodes))  # the writer thread's only
        self.loggers: list[Any] = []
        self.problems: list[str] = []  # loggers that could not be made, and why
        self._pool: ThreadPoolExecutor | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.names)

    def open(self) -> None:
        """Make the loggers (in the writer thread: Lightning is imported there)."""
        if self.enabled:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift-log")
            self._submit(self._open)

    def log_round(self, rec: RoundRecord) -> None:
        """Log one completed round (queued)."""
        if self._pool is not None:
            self._submit(self._write, rec)

    def close(self, status: str = "success") -> None:
        """Finalize every logger and wait for the writer thread. Blocking: call it from a
        thread (or at exit), not from the event loop."""
        if self._pool is None:
            return
        self._submit(self._finalize, status)
        self._pool.shutdown(wait=True)
        self._pool = None

    # -- the writer thread ------------------------------------------------------------------

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._pool is not None
        self._pool.submit(self._guarded, fn, *args)

    @staticmethod
    def _guarded(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # the session goes on without its log
            log.exception("session_log.failed call=%s", getattr(fn, "__name__", fn))

    def _open(self) -> None:
        for name in self.names:
            try:
                logger = make_logger(name, self.save_dir, self.run)
                if self.hparams:
                    logger.log_hyperparams(self.hparams)
            except Exception as exc:
                why = f"session logger {name!r} left out: {type(exc).__name__}: {exc}"
                self.problems.append(why)
                log.warning("%s", why)
                continue
            self.loggers.append(logger)
            log.info("session_log.open logger=%s dir=%s", name, _log_dir(logger))

    def _write(self, rec: RoundRecord) -> None:
        labelled, left_out = self.columns.assign([n.node for n in rec.nodes])
        names = {n.node: clean_text(n.name, 64) for n in rec.nodes}
        for node in labelled:
            log.info(
                "session_log.columns node=%s label=%s name=%r",
                short_id(node),
                self.columns.labels[node],
                names[node],
            )
        for node in left_out:
            log.warning(
                "session_log.node_left_out node=%s name=%r: the session log has columns for "
                "%d nodes (%d x --max-nodes), all taken; this node counts only in the "
                "round's totals",
                short_id(node),
                names[node],
                self.columns.cap,
                COLUMN_NODES_PER_MAX_NODE,
            )
        metrics = round_metrics(rec, self.columns.labels)
        for logger in self.loggers:
            logger.log_metrics(metrics, step=rec.completed_round)
            logger.save()
            experiment = getattr(logger, "_experiment", None)  # TensorBoard's writer, if made
            flush = getattr(experiment, "flush", None)
            if callable(flush):
                flush()  # so a running TensorBoard, or a test, sees the round now

    def _finalize(self, status: str) -> None:
        for logger in self.loggers:
            logger.finalize(status)


def _log_dir(logger: Any) -> str:
    try:
        return str(logger.log_dir)
    except Exception:
        return "?"


__all__ = [
    "COLUMN_NODES_PER_MAX_NODE",
    "LOGGER_CLASSES",
    "NodeColumns",
    "NodeRound",
    "RoundRecord",
    "SessionLog",
    "logger_class_path",
    "make_logger",
    "node_column_cap",
    "round_metrics",
    "round_record",
]
