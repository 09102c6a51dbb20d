"""The session's members: who joined, who is live, who is gone, who is banned. Pure.

Node lifecycle::

    joined ──NodeInfo accepted──▶ ready ──shard/progress──▶ training ──upload──▶ barrier
       │                                                                          │
       └──────────── heartbeat timeout / connection gone ──▶ lost ◀───────────────┘
                     Bye ──▶ left          (a lost or left node may join again with its key)

Membership is capped (``max_nodes`` live nodes, ``max_nodes_per_token`` per token), members
that are gone are forgotten after ``forget_after_s``, and a node whose uploads fail
``max_strikes`` times is banned for good (its key is refused from then on).

The boundary: the roster knows people, not work. What a member was assigned, what it trained
and how fast are the epoch book's and the pace book's; when a member is lost the session asks
those parts what to hand on. So the roster can be read (and tested) as the membership rules
alone: caps, names, timeouts, strikes and bans.
"""

from __future__ import annotations

import enum

import msgspec

from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.verdicts import Decision
from lightning_drift.protocol import NodeInfo, TrainProgress
from lightning_drift.scheduler import train_device_info
from lightning_drift.text import short_id


class MemberState(enum.Enum):
    """Where a node is in its lifecycle (see the module docstring's diagram)."""

    JOINED = "joined"  # Join accepted, NodeInfo not yet
    READY = "ready"  # admitted: NodeInfo accepted
    TRAINING = "training"  # has a shard (or reported progress)
    BARRIER = "barrier"  # its upload for the open round is counted
    LOST = "lost"  # heartbeat timeout or connection gone
    LEFT = "left"  # said Bye, or was refused at the handshake
    BANNED = "excluded"  # its uploads failed too often: its key is refused from now on
    # (the value is the word the status and saved states have always shown)


LIVE = frozenset({MemberState.JOINED, MemberState.READY, MemberState.TRAINING, MemberState.BARRIER})
GONE = frozenset({MemberState.LOST, MemberState.LEFT, MemberState.BANNED})
BANNED_MAX = 4096  # banned keys remembered (the oldest are forgotten first)


class Member(msgspec.Struct):
    """One node the session knows. Its paces are the pace book's, its work the epoch book's."""

    node: str
    name: str = ""
    state: MemberState = MemberState.JOINED
    joined_at: float = 0.0
    last_seen: float = 0.0
    device: str = ""
    vram_total: int = 0
    token: str = ""  # the jti of the token it joined with
    strikes: int = 0  # failed uploads
    gone_at: float = 0.0  # when it became lost, left or banned
    arrived_round: int = msgspec.field(default=0, name="round")  # its last counted round
    barrier_since: float | None = None
    counted_at: float = 0.0  # when its last upload that counted arrived (0: none yet)
    barrier_wait: float = 0.0  # how long it waited at its last completed barrier
    loss: float | None = None
    samples: int = 0
    # Samples of its uploads that counted and showed training, each as the session weighed it
    # (``Session.weight_for``): the work the coordinator knows it received, never a claim.
    delivered: int = 0
    data_peer: str = ""  # its data endpoint (a sharded session's members fetch pieces there)
    data_bytes: int = 0  # piece bytes it reports its data endpoint moved (display only)
    vram_used: int = 0  # bytes on its training device, last report
    vram_peak: int = 0  # the most it reported
    reason: str = ""  # why it is lost/left

    def live(self) -> bool:
        return self.state in LIVE


def info_refusal(info: NodeInfo, dataset_size: int, fingerprint: str) -> Decision | None:
    """Why a node's ``NodeInfo`` does not fit the session that trains ``dataset_size``
    samples of the model with ``fingerprint`` (either 0/"" while not known yet), or None."""
    if dataset_size and info.dataset_size != dataset_size:
        return Decision(
            False,
            f"dataset has {info.dataset_size} samples but this session trains on "
            f"{dataset_size}; use the same dataset as the other nodes",
            "dataset_mismatch",
        )
    if fingerprint and info.model_fingerprint != fingerprint:
        return Decision(
            False,
            "the model's parameter names, shapes or dtypes differ from the session's "
            f"(fingerprint {info.model_fingerprint[:12]}…, session "
            f"{fingerprint[:12]}…); every node must build the same model",
            "model_mismatch",
        )
    return None


class Roster(msgspec.Struct):
    """The members, the nodes the scheduler knows (``admitted``) and the banned keys."""

    members: dict[str, Member] = {}
    admitted: set[str] = set()
    banned: dict[str, str] = {}  # banned node -> why (its Joins are refused)

    def live(self) -> list[str]:
        return [n for n, m in self.members.items() if m.live()]

    def seen(self, node: str, now: float) -> None:
        """Any message from ``node`` (heartbeat)."""
        m = self.members.get(node)
        if m is not None and m.live():
            m.last_seen = now

    def join(
        self, node: str, name: str, now: float, token: str, config: SessionConfig, finished: bool
    ) -> Decision:
        """A Join with a valid token (jti ``token``) whose QUIC peer key is ``node``.

        Refused: a banned node (code ``excluded``), and a node over the caps on live members
        (``max_nodes``, ``max_nodes_per_token``: ``too_many_nodes``). ``name`` is made unique
        among the members (``name#2``, ...). After the session ``finished``, a node may still
        join (as left) to fetch the final weights."""
        if node in self.banned:
            return Decision(
                False,
                f"node {short_id(node)} is excluded from this session: {self.banned[node]}",
                "excluded",
            )
        if not finished and (full := self._full(node, token, config)):
            return Decision(False, full, "too_many_nodes")
        name = self.unique_name(node, name)
        m = self.members.get(node)
        if m is None:
            m = self.members[node] = Member(
                node=node, name=name, joined_at=now, last_seen=now, token=token
            )
            if not finished:
                return Decision(True, f"node {short_id(node)} joined")
        if finished:
            # Nothing left to train, but a node that comes back late (resumed from its own
            # checkpoint, or cut off at the very end) may still fetch the final weights with a
            # start-up sync; its shard request is then answered with Finish.
            m.state, m.last_seen, m.gone_at = MemberState.LEFT, now, now
            return Decision(True, "the session has finished: the node may fetch the final weights")
        was = m.state
        m.name, m.last_seen, m.joined_at = name or m.name, now, now
        m.state, m.reason, m.token = MemberState.JOINED, "", token or m.token
        if was in GONE:
            return Decision(True, f"node {short_id(node)} rejoined (was {was.value})")
        return Decision(True, f"node {short_id(node)} reconnected (was {was.value})")

    def _full(self, node: str, token: str, c: SessionConfig) -> str:
        """Why ``node`` would be over a cap on live members ("" when it is not)."""
        others = [x for n, x in self.members.items() if n != node and x.live()]
        if len(others) >= c.max_nodes:
            return (
                f"the session has its maximum of {c.max_nodes} live nodes (--max-nodes); try "
                "again when one leaves"
            )
        if token and c.max_nodes_per_token <= sum(1 for x in others if x.token == token):
            return (
                f"token {token} already has {c.max_nodes_per_token} live nodes "
                "(--max-nodes-per-token); ask the coordinator for a token of your own"
            )
        return ""

    def unique_name(self, node: str, name: str) -> str:
        """``name``, or ``name#k`` with the smallest k ≥ 2 no other member uses."""
        if not name:
            return name
        taken = {m.name for n, m in self.members.items() if n != node}
        if name not in taken:
            return name
        k = 2
        while f"{name}#{k}" in taken:
            k += 1
        return f"{name}#{k}"

    def ready(self, node: str, info: NodeInfo) -> Decision:
        """``node``'s NodeInfo was accepted: it is ready, on the device it named."""
        m = self.members[node]
        dev = train_device_info(info)
        m.device = info.train_device if dev is None else f"{info.train_device} {dev.name}"
        m.vram_total = dev.vram_total if dev is not None else 0
        m.data_peer = info.data_peer
        m.state = MemberState.READY
        return Decision(True, f"node {short_id(node)} ready on {m.device}")

    def progress(self, node: str, msg: TrainProgress, now: float) -> bool:
        """A progress report from ``node``: False (ignored) when it is not live."""
        m = self.members.get(node)
        if m is None or not m.live():
            return False
        m.last_seen = now
        if m.state is MemberState.READY:
            m.state = MemberState.TRAINING
        m.loss, m.samples = msg.loss, msg.samples
        m.vram_used = max(0, msg.vram_used)
        m.data_bytes = max(0, msg.data_bytes)
        m.vram_peak = max(m.vram_peak, msg.vram_peak, m.vram_used)
        return True

    def at_barrier(
        self, node: str, upload_round: int, samples: int, now: float, *, delivered: int = 0
    ) -> None:
        """``node``'s upload of ``samples`` counts in ``upload_round``: it waits there;
        ``delivered``: the samples of it that showed training (see :attr:`Member.delivered`)."""
        m = self.members[node]
        m.state, m.arrived_round, m.barrier_since = MemberState.BARRIER, upload_round, now
        m.samples, m.counted_at = samples, now
        m.delivered += max(0, delivered)

    def barriers_done(self, nodes: list[str], now: float) -> None:
        """The round ``nodes`` waited at completed: they train on."""
        for node in nodes:
            m = self.members[node]
            if m.barrier_since is not None:
                m.barrier_wait = now - m.barrier_since
            m.barrier_since = None
            if m.state is MemberState.BARRIER:
                m.state = MemberState.TRAINING

    def gone(self, node: str, reason: str, now: float, *, left: bool) -> Member | None:
        """``node`` is lost (or ``left``); None when it was not live."""
        m = self.members.get(node)
        if m is None or not m.live():
            return None
        m.state = MemberState.LEFT if left else MemberState.LOST
        m.reason, m.gone_at, m.barrier_since = reason, now, None
        return m

    def timed_out(self, now: float, timeout: float) -> list[tuple[str, str]]:
        """Live members silent for longer than ``timeout``, with why (to be lost)."""
        return [
            (
                node,
                f"no message for {now - m.last_seen:.1f}s (heartbeat timeout {timeout:g}s)",
            )
            for node, m in self.members.items()
            if m.live() and now - m.last_seen > timeout
        ]

    def forget(self, now: float, after_s: float, keep_max: int) -> list[str]:
        """Drop members gone for longer than ``after_s`` (and the oldest gone ones beyond
        ``keep_max`` of them); returns them. A forgotten node that comes back joins as a new
        one (a banned one stays refused)."""
        gone = sorted((m.gone_at, n) for n, m in self.members.items() if m.state in GONE)
        drop = [n for t, n in gone if now - t > after_s]
        keep = [n for _, n in gone if n not in drop]
        drop += keep[: max(0, len(keep) - keep_max)]
        for n in drop:
            del self.members[n]
            self.admitted.discard(n)
        return drop

    def strike(self, node: str, limit: int) -> Decision:
        """One of ``node``'s uploads failed. ``ok`` when this is its ``limit``-th and it is to
        be banned (the caller loses it, then :meth:`ban`)."""
        m = self.members.get(node)
        if m is None:
            return Decision(False, f"node {short_id(node)} is not a member")
        m.strikes += 1
        if m.strikes < limit or m.state is MemberState.BANNED:
            return Decision(False, f"node {short_id(node)}: failed upload {m.strikes}/{limit}")
        return Decision(True, f"{m.strikes} failed uploads")

    def ban(self, node: str, why: str, now: float) -> Decision:
        """Refuse ``node``'s key for good."""
        m = self.members[node]
        m.state, m.reason, m.gone_at = MemberState.BANNED, why, now
        self.banned[node] = why
        while len(self.banned) > BANNED_MAX:
            del self.banned[next(iter(self.banned))]
        return Decision(True, f"node {short_id(node)} excluded: {why}", "excluded")

    def restored(self, now: float, grace: float) -> None:
        """After a coordinator restart: members that were live are training, with ``grace``
        (from ``now``) to reconnect before they are lost; what only a live connection knew
        (barrier times, the last report) starts afresh."""
        for m in self.members.values():
            if m.state not in GONE:
                m.state, m.gone_at = MemberState.TRAINING, 0.0
            m.last_seen = now + grace
            m.barrier_since, m.barrier_wait, m.loss = None, 0.0, None
            m.samples = m.vram_used = m.vram_peak = 0


__all__ = ["BANNED_MAX", "GONE", "LIVE", "Member", "MemberState", "Roster", "info_refusal"]
