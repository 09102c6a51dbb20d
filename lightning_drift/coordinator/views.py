"""What the session shows: the training config a node gets, and the status observers see.

Pure functions of the session's parts: nothing here decides anything, and nothing a view
computes flows back into a decision. Apart so that what is shown can change (a column, an
order) without touching a rule, and a rule without touching what is shown.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning_drift.coordinator.boundary import finite
from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.pacebook import PaceBook
from lightning_drift.coordinator.roster import Member
from lightning_drift.protocol import NodeStatus, ShardAssignment, TrainConfig


def train_config(
    c: SessionConfig,
    *,
    session_id: str,
    dataset_size: int,
    completed: int,
    epoch: int,
    has_weights: bool,
    stop_round: int | None,
) -> TrainConfig:
    """The ``TrainConfig`` a node gets when it joins."""
    return TrainConfig(
        session_id=session_id,
        epochs=c.epochs,
        batch_size=c.batch_size,
        sync_every=c.sync_every,
        aggregation=c.aggregation,
        outer_lr=c.outer_lr,
        outer_momentum=c.outer_momentum,
        transfer_dtype=c.transfer_dtype,
        seed=c.seed,
        dataset_size=dataset_size,
        round=completed,
        epoch=epoch,
        heartbeat_s=c.heartbeat_s,
        progress_every_s=c.progress_every_s,
        has_weights=has_weights,
        min_nodes=c.min_nodes,
        lightning_config=c.lightning_config,
        stop_round=-1 if stop_round is None else stop_round,
        overlap=c.overlap,
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


def session_state(*, finished: bool, planned: bool, aggregating: bool) -> str:
    """The one word the status gives the session."""
    if finished:
        return "finished"
    if not planned:
        return "waiting"
    return "aggregating" if aggregating else "training"


__all__ = ["node_status", "nodes_status", "session_state", "train_config"]
