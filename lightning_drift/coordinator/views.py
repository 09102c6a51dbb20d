"""What the session shows: the training config a node gets, and the status observers see.

Pure functions of the session's parts: nothing here decides anything, and nothing a view
computes flows back into a decision. Apart so that what is shown can change (a column, an
order) without touching a rule, and a rule without touching what is shown.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from lightning_drift.coordinator.boundary import finite
from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.pacebook import PaceBook
from lightning_drift.coordinator.roster import Member
from lightning_drift.protocol import NodeStatus, SessionStatus, ShardAssignment, TrainConfig
from lightning_drift.scheduler import EpochPlan


class Shown(Protocol):
    """What the views read of a session (``Session`` has it all)."""

    config: SessionConfig
    session_id: str
    started_at: float
    dataset_size: int
    has_weights: bool
    completed: int
    epoch: int
    finished: bool
    paces: PaceBook

    @property
    def plan(self) -> EpochPlan | None: ...
    @property
    def aggregating(self) -> int | None: ...
    @property
    def members(self) -> dict[str, Member]: ...
    @property
    def assignments(self) -> dict[str, ShardAssignment]: ...
    @property
    def stop_requests(self) -> dict[str, str]: ...
    @property
    def stop_round(self) -> int | None: ...
    @property
    def stop_reason(self) -> str: ...


def train_config(s: Shown) -> TrainConfig:
    """The ``TrainConfig`` a node gets when it joins."""
    c = s.config
    return TrainConfig(
        session_id=s.session_id,
        epochs=c.epochs,
        batch_size=c.batch_size,
        sync_every=c.sync_every,
        aggregation=c.aggregation,
        outer_lr=c.outer_lr,
        outer_momentum=c.outer_momentum,
        outer_warmup=c.outer_warmup,
        residual=c.residual,
        transfer_dtype=c.transfer_dtype,
        seed=c.seed,
        dataset_size=s.dataset_size,
        round=s.completed,
        epoch=s.epoch,
        heartbeat_s=c.heartbeat_s,
        progress_every_s=c.progress_every_s,
        has_weights=s.has_weights,
        min_nodes=c.min_nodes,
        lightning_config=c.lightning_config,
        stop_round=-1 if s.stop_round is None else s.stop_round,
        overlap=c.overlap,
        data_plane=c.data_plane,
        shards=c.shards,
        robust=c.robust,
        trim=c.trim,
    )


def node_status(
    m: Member,
    now: float,
    a: ShardAssignment | None,
    paces: PaceBook,
    stop_asked: bool,
) -> NodeStatus:
    """One member as the status shows it (its reported pace: the latest window)."""
    wait = m.barrier_wait if m.barrier_since is None else now - m.barrier_since
    return NodeStatus(
        node_id=m.node,
        name=m.name,
        device=m.device,
        vram_total=m.vram_total,
        share=a.share if a is not None else 0.0,
        samples_per_s=finite(paces.of(m.node).reported),
        round=m.arrived_round,
        state=m.state.value,
        barrier_wait_s=wait,
        loss=m.loss,
        samples=m.samples,
        vram_used=m.vram_used,
        vram_peak=m.vram_peak,
        stop_asked=stop_asked,
        data_bytes=m.data_bytes,
    )


def nodes_status(
    members: Mapping[str, Member],
    now: float,
    assignments: Mapping[str, ShardAssignment],
    paces: PaceBook,
    stop_requests: Mapping[str, str],
) -> list[NodeStatus]:
    """Every member, in join order."""
    return [
        node_status(m, now, assignments.get(node), paces, node in stop_requests)
        for node, m in members.items()
    ]


def session_state(s: Shown) -> str:
    """The one word the status gives the session."""
    if s.finished:
        return "finished"
    if s.plan is None:
        return "waiting"
    return "aggregating" if s.aggregating is not None else "training"


def status(s: Shown, now: float, checkpoint: str = "") -> SessionStatus:
    """The session as observers see it (every member, in join order)."""
    return SessionStatus(
        session_id=s.session_id,
        state=session_state(s),
        round=s.completed,
        epoch=s.epoch,
        epochs=s.config.epochs,
        aggregation=s.config.aggregation,
        nodes=nodes_status(s.members, now, s.assignments, s.paces, s.stop_requests),
        checkpoint=checkpoint,
        started_at=s.started_at,
        stop_reason=s.stop_reason,
    )


__all__ = ["Shown", "node_status", "nodes_status", "session_state", "status", "train_config"]
