"""One round's life on the coordinator: decode, aggregate, outer step, check, write, publish.

:class:`Rounds` holds the global weights and the round being built from the uploads. The
server hands it each upload together with the session's verdict (:meth:`Rounds.take`), and
asks it which weights answer that upload (:meth:`Rounds.answer`); every round decision of the
session goes through :meth:`Rounds.consider`, which completes the round when it says so.

A round's data goes through five steps, each in its own place here:

1. **decode** (:meth:`Rounds.decode`): an upload's blob becomes a state dict, either the
   node's weights or its change from the current global weights (``delta``, dequantized by
   :func:`lightning_drift.codec.decode`; a change from other weights than those is left out
   first, :meth:`Rounds.stale_base`); its safetensors header was already checked against the
   model before the body was read (``boundary.UploadCheck``, :meth:`Rounds.upload_check`);
2. **aggregate** (:meth:`Rounds.new_accumulator`): the round's contributions are combined,
   each seen as a change against the current global weights: the exact weighted mean
   (``aggregate.Accumulator``), or a robust combination (``robust.RobustAccumulator``:
   trimmed mean, median, norm clip) when the session asks for one;
3. **outer step** (:meth:`Rounds.outer_step`): ``mean`` takes the aggregate as the round's
   target, ``diloco`` takes a Nesterov step on the pseudo-gradient; the new global weights
   are the current ones moved to the target: exactly, or with ``--transfer-dtype
   bfloat16|int8`` by the encoded change towards it, the coordinator's own error feedback
   carried to the next round (:meth:`Rounds.download`);
4. **check** (``aggregate.check_aggregate``): the new weights must be finite and within
   ``max_change`` of the old ones; a round that fails is *not published*: the previous global
   weights stay (and are checkpointed again as this round's), DiLoCo's momentum and the
   download residual are not moved, and the log names the cause and the nodes whose change
   stood out, each of which gets a strike (``Session.strike``: enough of them exclude a node);
5. **write and publish**: the checkpoint (weights, outer state: DiLoCo's momentum and the
   download residual, manifest), then ``state.json``; then every node waiting at the barrier
   is answered with the new weights (:meth:`Weights.payload_for`: nothing, the encoded
   change, or the whole weights, by what the node holds), so every node holds exactly the
   checkpoint.

A completion that fails (disk full, out of memory) leaves the round's state uncertain: the
listener is told (:meth:`RoundListener.failed`), and the coordinator stops rather than hang
every node; a restart resumes from the last round whose state was saved (:meth:`Rounds.load`).

Heavy work (decoding, accumulating, aggregating, serializing, disk) runs in threads, so the
event loop keeps answering heartbeats meanwhile. One lock orders the accumulator against the
completion: an upload is added to the round it was accepted for, or to none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lightning_drift import codec, modelspec
from lightning_drift.aggregate import (
    Accumulator,
    DiLoCo,
    check_aggregate,
    from_bytes,
    to_bytes,
    validate_upload,
)
from lightning_drift.checkpoint import CheckpointInfo, CheckpointStore
from lightning_drift.coordinator.boundary import UploadCheck
from lightning_drift.coordinator.logs import NodeRound, RoundRecord, metric_label
from lightning_drift.coordinator.session import (
    RoundDecision,
    RoundOutcome,
    Session,
    UploadVerdict,
    Verdict,
)
from lightning_drift.coordinator.state import StateDir
from lightning_drift.errors import ConfigError, DriftError, SessionError
from lightning_drift.fsutil import sha256_bytes, sha256_file
from lightning_drift.hardware import physical_memory
from lightning_drift.protocol import BarrierSync, Finish, Payload
from lightning_drift.robust import RobustAccumulator, suspects

log = logging.getLogger(__name__)

_UNKNOWN_MEMORY = 16 << 30  # assumed when the OS will not say how much memory there is
# A contributor of a round whose aggregate failed the check is named as its cause when its
# change is this many times the round's median change (or more).
SUSPECT_FACTOR = 10.0
OPERATOR = "operator"  # the contributor of round 0 when `--init` seeded it


_EMPTY_SHA256 = sha256_bytes(b"")
# Keys of the download residual in a checkpoint's outer-state file (beside DiLoCo's momentum,
# which is keyed by the plain tensor names).
RESIDUAL_PREFIX = "download_residual/"


@dataclass(frozen=True)
class Weights:
    """The published global weights: the result of completed round ``completed_round``.

    With compressed transfers, ``delta`` is the encoded change from the global weights
    ``base_sha256`` (of round ``base_round``) to these: what a node holding those receives
    instead of ``blob``."""

    completed_round: int
    epoch: int
    sha256: str
    blob: bytes  # exactly the bytes of the checkpoint file ``path``
    path: str
    finished: bool = False  # the session's final weights
    delta: bytes | None = None
    delta_sha256: str = ""
    base_round: int = -1
    base_sha256: str = ""

    def payload_for(self, held_sha256: str) -> tuple[Payload, bytes, str]:
        """(payload kind, blob, its sha256) that gives these weights to a node holding the
        weights ``held_sha256`` ("" for none): nothing if it holds these already, the change
        if it holds their base, else the whole weights."""
        if held_sha256 and held_sha256 == self.sha256:
            return "same", b"", _EMPTY_SHA256
        if self.delta is not None and held_sha256 and held_sha256 == self.base_sha256:
            return "delta", self.delta, self.delta_sha256
        return "weights", self.blob, self.sha256


class RoundListener(Protocol):
    """What the server does when a round moves on (it owns the connections)."""

    def event(self, text: str) -> None:
        """A decision or a refusal worth showing the operator."""

    def round_completed(self, outcome: RoundOutcome) -> None:
        """New global weights are published (and maybe a new epoch planned, or the end)."""

    def failed(self, reason: str) -> None:
        """A round could not be completed; the coordinator must stop (see the module doc)."""

    def excluded(self, node: str, reason: str) -> None:
        """``node`` is excluded from the session: end its connection (see ``Session.strike``)."""


class Rounds:
    """The global weights and the round being built; see the module docstring.

    ``spawn`` runs a coroutine as a task the server owns (cancelled when it closes);
    ``record`` is given a :class:`~lightning_drift.coordinator.logs.RoundRecord` of every
    completed round (the session's log).
    """

    def __init__(
        self,
        session: Session,
        store: CheckpointStore,
        state: StateDir,
        *,
        clock: Callable[[], float],
        listener: RoundListener,
        spawn: Callable[[Coroutine[Any, Any, Any]], Any],
        record: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        self.session = session
        self.record = record
        # The open round's counted uploads: node -> (its BarrierSync, upload bytes).
        self._counted: dict[str, tuple[BarrierSync, int]] = {}
        self.store = store
        self.state = state
        self.clock = clock
        self.listener = listener
        self.spawn = spawn
        config = session.config
        self.diloco: DiLoCo | None = None
        if config.aggregation == "diloco":
            self.diloco = DiLoCo(lr=config.outer_lr, momentum=config.outer_momentum)
        # Compressed downloads: the codec, and the error feedback the coordinator carries.
        self.codec = config.transfer_dtype if config.transfer_dtype in codec.CODECS else None
        self.residual = codec.Residual()
        self.current: Weights | None = None  # the published global weights
        self.global_sd: dict[str, Any] | None = None  # the same, decoded
        self.acc: Accumulator | RobustAccumulator | None = None  # the open round's
        self._waiters: dict[int, asyncio.Future[Weights]] = {}  # completed round -> its weights
        self._lock = asyncio.Lock()  # the accumulator and the completion take turns
        self._save_lock = asyncio.Lock()
        self._completing = False
        self._last_reason = ""

    # ---- restart -------------------------------------------------------------------------
    async def load(self) -> None:
        """On a restart: publish the checkpoint of the session's last completed round (and
        restore DiLoCo's momentum). ConfigError, saying what to do, when it cannot be read."""
        if not self.session.has_weights:
            return
        # Read and decoded in a thread; published on the loop (it resolves futures).
        sd, blob, info = await asyncio.to_thread(self._read_checkpoint)
        self._publish(sd, blob, info)
        log.info("checkpoint.loaded round=%d sha256=%s", info.completed_round, info.sha256[:16])

    async def seed(self, path: Path) -> None:
        """Round 0 from the operator's weights file (``--init``): they become the global
        weights, and the model every node must train (its fingerprint is pinned).
        ConfigError when the file is not a usable safetensors state dict."""
        s = self.session
        assert not s.has_weights
        try:
            raw = await asyncio.to_thread(Path(path).read_bytes)
        except OSError as exc:
            raise ConfigError(f"--init {path}: cannot read it ({exc.strerror or exc})") from None
        try:
            sd = await asyncio.to_thread(from_bytes, raw)
            if not sd:
                raise SessionError("it holds no tensors", code="bad_upload")
            await asyncio.to_thread(validate_upload, sd, sd)
        except SessionError as exc:
            raise ConfigError(
                f"--init {path} is not a usable safetensors state dict: {exc}; save the "
                "model's state_dict() with safetensors.torch.save_file"
            ) from None
        fp = modelspec.state_fingerprint(sd)
        if s.model_fingerprint and s.model_fingerprint != fp:
            raise ConfigError(
                f"--init {path} is another model than the session's nodes announced "
                f"(fingerprint {fp[:12]}…, the session's {s.model_fingerprint[:12]}…)"
            )
        async with self._lock:
            s.model_fingerprint = fp
            await self._write_initial(OPERATOR, sd, {"init": str(path)})
        self.listener.event(f"round 0: initial weights from {path} ({len(raw)} bytes)")

    def _read_checkpoint(self) -> tuple[Any, bytes, CheckpointInfo]:
        completed = self.session.completed
        try:
            info, blob, outer = self.store.load(completed)
        except DriftError:
            raise ConfigError(
                f"cannot resume session {self.session.session_id} at round {completed}: "
                f"{self._checkpoint_problem(completed)}. Restore the round's checkpoint files "
                f"and manifest.json into {self.store.directory} from a backup (if the first "
                "start had --checkpoint-dir, give the same one), or move "
                f"{self.state.path / 'state.json'} aside to start a new session with the same "
                "identity"
            ) from None
        sd = from_bytes(blob)
        if outer is not None:
            self._load_outer_state(from_bytes(outer))
        return sd, blob, info

    def _checkpoint_problem(self, completed: int) -> str:
        """Why the checkpoint of round ``completed`` cannot be loaded, for the operator."""
        try:
            entries = self.store.checkpoints()
        except DriftError as exc:  # the manifest itself is unreadable
            return str(exc)
        info = next((e for e in entries if e.completed_round == completed), None)
        if info is None:
            kept = ", ".join(str(e.completed_round) for e in entries) or "none"
            return f"{self.store.directory} has no checkpoint of round {completed} (rounds: {kept})"
        for path, sha in ((info.path, info.sha256), (info.outer_path, info.outer_sha256)):
            if path is None:
                continue
            try:
                if sha256_file(path) != sha:
                    return f"{path} is damaged (its sha256 is not the one in manifest.json)"
            except OSError as exc:
                return f"{path} cannot be read ({exc.strerror or exc})"
        return f"the checkpoint of round {completed} in {self.store.directory} cannot be read"

    # ---- uploads -------------------------------------------------------------------------
    def upload_check(self, sync: BarrierSync) -> UploadCheck:
        """What an upload's safetensors header must show before its body is read: the global
        weights' tensor table (the model's fingerprint before round 0)."""
        table = modelspec.table_of(self.global_sd) if self.global_sd is not None else None
        return UploadCheck(
            fingerprint=self.session.model_fingerprint,
            table=table,
            delta=sync.delta and sync.round > 0,
        )

    def decode(self, blob: bytes, sync: BarrierSync | None = None) -> dict[str, Any]:
        """(1) An upload's blob as a state dict: whole weights, or (``sync.delta``) the node's
        change from the current global weights, dequantized (``codec.decode``).
        SessionError(bad_upload) when unreadable."""
        if sync is None or not sync.delta:
            return from_bytes(blob)
        assert self.global_sd is not None
        return codec.decode(blob, self.global_sd)

    def new_accumulator(self, global_sd: dict[str, Any]) -> Accumulator | RobustAccumulator:
        """(2) What combines the next round's contributions: the exact streaming mean, or a
        robust combination when the session asks for one (it keeps every contribution)."""
        c = self.session.config
        if c.robust == "off" and c.clip <= 0:
            return Accumulator(global_sd)
        return RobustAccumulator(global_sd, method=c.robust, trim=c.trim, clip=c.clip)

    def outer_step(self, global_sd: dict[str, Any], mean: dict[str, Any]) -> dict[str, Any]:
        """(3) The weights the round aims at: the mean itself, or DiLoCo's outer step from the
        current global weights towards it (its pseudo-gradient is global - mean, the mean over
        the contributors only: a straggler left out adds nothing to it)."""
        if self.diloco is not None:
            return self.diloco.step(global_sd, mean)
        return mean

    def max_upload(self, max_model_bytes: int) -> tuple[int, str]:
        """The largest upload accepted now, and what to tell a node that sends more.

        ``max_model_bytes`` bounds the start-up weights (0: half of this machine's memory);
        later uploads are bounded by the global weights' size."""
        if self.current is None:
            limit = max_model_bytes or (physical_memory() or _UNKNOWN_MEMORY) // 2
            return limit, (
                "start-up weights larger than this coordinator accepts; start `drift-coord "
                "serve` with a larger --max-model-mb if it has the memory for the model"
            )
        return 4 * len(self.current.blob) + (1 << 20), "4 × the global weights' size"

    async def take(
        self, node: str, sync: BarrierSync, blob: bytes, verdict: UploadVerdict
    ) -> UploadVerdict:
        """Act on one upload the session has given ``verdict``; returns the verdict to answer
        by (:meth:`answer`). SessionError when the upload is bad (the node is then left out
        of the round); a ``REFUSE`` verdict is the caller's to answer."""
        match verdict.kind:
            case Verdict.INITIAL:
                if await self._adopt(node, blob):
                    return verdict
                return UploadVerdict(Verdict.CURRENT, "start-up sync: global weights")
            case Verdict.LEFT_OUT:
                self._left_out(node, sync.round, verdict.reason)
                return verdict
            case Verdict.OPEN:
                stale = self.stale_base(sync)
                if stale:
                    # An honest race (the node's base moved on), not a bad upload: no strike.
                    self.reject(node, sync.round, stale, strike=False)
                    return UploadVerdict(Verdict.LEFT_OUT, stale)
                try:
                    sd = await asyncio.to_thread(self.decode, blob, sync)
                except SessionError as exc:
                    self.reject(node, sync.round, str(exc))
                    raise
                # Adding into the shared sums must run to its end even if this node's
                # connection drops meanwhile (which cancels its tasks): a half-added upload
                # would corrupt the round, and the sums and the session must agree on who
                # arrived.
                return await asyncio.shield(
                    asyncio.ensure_future(self._accumulate(node, sync, sd, len(blob)))
                )
            case _:
                return verdict

    def stale_base(self, sync: BarrierSync) -> str:
        """Why a delta upload cannot be added to the current global weights ("" if it can): it
        names other weights than those as its base. (The session has checked the round.)"""
        assert self.current is not None
        if not sync.delta or not sync.base_sha256 or sync.base_sha256 == self.current.sha256:
            return ""
        return (
            f"delta against weights {sync.base_sha256[:12]}… (round {sync.base_round}), but the "
            f"global weights of round {self.current.completed_round} are "
            f"{self.current.sha256[:12]}…: left out of round {sync.round}"
        )

    async def _accumulate(
        self, node: str, sync: BarrierSync, sd: Any, nbytes: int = 0
    ) -> UploadVerdict:
        s = self.session
        async with self._lock:
            # The round may have closed while the upload was decoded.
            verdict = s.upload(
                node, sync.round, self.clock(), base_round=sync.base_round, delta=sync.delta
            )
            if verdict.kind is Verdict.LEFT_OUT:
                self._left_out(node, sync.round, verdict.reason)
            if verdict.kind is not Verdict.OPEN:
                return verdict
            assert self.acc is not None
            # Samples trained since the last barrier, at most the node's shard; 0 (nothing
            # left in its shard) adds nothing.
            weight = s.weight_for(node, sync.samples)
            try:
                await asyncio.to_thread(self.acc.add, node, sd, weight, delta=sync.delta)
            except SessionError as exc:
                self.reject(node, sync.round, str(exc))
                raise
            decision = s.arrived(
                node,
                sync.round,
                sync.samples,
                self.clock(),
                sync.train_seconds,
                epoch=sync.epoch,
                epoch_samples=sync.epoch_samples,
                loss=sync.loss,
            )
            self._counted[node] = (sync, nbytes)
        log.info("barrier.arrived node=%s round=%d samples=%d", node[:8], sync.round, sync.samples)
        self.consider(decision)
        return verdict

    def reject(self, node: str, upload_round: int, reason: str, *, strike: bool = True) -> None:
        """A bad upload for ``upload_round``: the node is left out of it, which may complete.
        With ``strike`` it counts as one of the node's failed uploads."""
        self.listener.event(f"node {node[:8]} upload for round {upload_round} refused: {reason}")
        self.consider(self.session.reject(node, upload_round, reason, self.clock()))
        if strike:
            self.strike(node, reason)

    def strike(self, node: str, reason: str) -> None:
        """One failed upload of ``node``; the listener ends it when that excludes it."""
        d = self.session.strike(node, reason, self.clock())
        self.listener.event(d.reason)
        if d.ok:
            self.listener.excluded(node, d.reason)
            self.consider(self.session.check(self.clock()))

    def _left_out(self, node: str, upload_round: int, reason: str) -> None:
        """The session left ``node`` out of the open round: it may now complete."""
        self.listener.event(f"node {node[:8]} upload for round {upload_round} refused: {reason}")
        self.consider(self.session.check(self.clock()))

    async def answer(self, verdict: UploadVerdict, upload_round: int) -> Weights:
        """The global weights that answer an upload for ``upload_round`` given ``verdict``
        (by :meth:`take`): the current ones, or the open round's result once published."""
        if verdict.kind is Verdict.CURRENT:
            # A round that has just completed is published only once the state file is
            # written: wait for its weights rather than hand out older ones.
            return await self._published(self.session.completed)
        if verdict.kind.at_once:
            assert self.current is not None
            return self.current
        return await self._published(upload_round)

    async def _published(self, completed_round: int) -> Weights:
        """The published weights of ``completed_round`` or a later round."""
        if self.current is not None and self.current.completed_round >= completed_round:
            return self.current
        fut = self._waiters.get(completed_round)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._waiters[completed_round] = fut
        return await asyncio.shield(fut)

    async def _adopt(self, node: str, blob: bytes) -> bool:
        """The first start-up weights become round 0; False if another node's came first.

        They must be the model the nodes announced (the session's pinned fingerprint); its
        header was checked before the body was read, this checks the decoded tensors."""
        async with self._lock:
            if self.session.has_weights:
                return False
            if not blob:
                raise SessionError(
                    "this coordinator has no global weights yet: send the start-up weights",
                    code="need_weights",
                )
            try:
                sd = await asyncio.to_thread(self.decode, blob)
                await asyncio.to_thread(validate_upload, sd, sd)
                fp = modelspec.state_fingerprint(sd)
                if fp != self.session.model_fingerprint:
                    raise SessionError(
                        "start-up weights are not the model the nodes announced (fingerprint "
                        f"{fp[:12]}…, the session's {self.session.model_fingerprint[:12]}…)",
                        code="bad_upload",
                    )
            except SessionError as exc:
                self.reject(node, 0, str(exc))
                raise
            size = await self._write_initial(node, sd, {})
        self.listener.event(f"round 0: start-up weights from node {node[:8]} ({size} bytes)")
        return True

    async def _write_initial(self, contributor: str, sd: Any, extra: dict[str, str]) -> int:
        """Round 0's checkpoint from ``sd``, durable and published (hold the lock)."""
        canon = await asyncio.to_thread(to_bytes, sd)
        outer = await asyncio.to_thread(self._outer_state)
        now = self.clock()
        info = await asyncio.to_thread(
            self.store.write,
            0,
            canon,
            outer=outer,
            epoch=0,
            contributors=[(contributor, 1.0)],
            now=now,
            extra={"session": self.session.session_id, **extra},
        )
        self.session.initial(now)
        await self.save_session()
        self._publish(sd, canon, info)
        return len(canon)

    # ---- completion ----------------------------------------------------------------------
    def consider(self, decision: RoundDecision) -> None:
        """Every round decision of the session comes here; a complete one is acted on."""
        if decision.reason != self._last_reason:
            self._last_reason = decision.reason
            log.debug("round.decision %s", decision.reason)
        if decision.complete and not self._completing:
            self._completing = True
            self.spawn(self._complete(decision))

    async def _complete(self, decision: RoundDecision) -> None:
        s = self.session
        closing = decision.open_round
        try:
            async with self._lock:
                s.close(closing)
                acc, self.acc = self.acc, None
                counted, self._counted = self._counted, {}
            assert acc is not None and self.global_sd is not None
            self.listener.event(decision.reason)
            epoch = s.epoch
            opened = s.round_started
            t0 = time.perf_counter()
            new_sd, blob, info, refused, delta = await asyncio.to_thread(
                self._aggregate, closing, epoch, acc
            )
            aggregation_s = time.perf_counter() - t0
            # Once the session has moved on, the next round is open and its uploads may come
            # in while the state file is written; holding the lock until the new global
            # weights (and with them the next accumulator) exist makes them wait for it.
            async with self._lock:
                outcome = s.advance(closing, self.clock())
                await self.save_session()
                self._publish(new_sd, blob, info, delta)
            log.info(
                "round.completed round=%d contributors=%d seconds=%.3f sha256=%s",
                closing,
                len(acc.contributors),
                time.perf_counter() - t0,
                info.sha256[:16],
            )
            if refused is not None:
                why, blamed = refused
                names = ", ".join(n[:8] for n in blamed) or "none stands out"
                self.listener.event(
                    f"round {closing} not published: its aggregate {why}; the global weights "
                    f"stay round {closing - 1}'s; contributors "
                    f"{', '.join(n[:8] for n, _ in acc.contributors)}; suspects: {names}"
                )
                for node in blamed:
                    self.strike(node, f"round {closing}'s aggregate {why}")
            if outcome.planned_epoch is not None or outcome.finished:
                self.listener.event(outcome.reason)
            if self.record is not None:
                self.record(
                    self._round_record(
                        outcome, acc, counted, len(blob), max(0.0, self.clock() - opened),
                        aggregation_s,
                    )
                )  # fmt: skip
            self.listener.round_completed(outcome)
        except Exception as exc:
            log.critical("round.failed round=%d error=%r", closing, exc)
            self.listener.failed(
                f"round {closing} could not be completed: {type(exc).__name__}: {exc}"
            )
            return
        finally:
            self._completing = False
        self.consider(s.check(self.clock()))

    def _round_record(
        self,
        outcome: RoundOutcome,
        acc: Accumulator | RobustAccumulator,
        counted: dict[str, tuple[BarrierSync, int]],
        size: int,
        round_s: float,
        aggregation_s: float,
    ) -> RoundRecord:
        """What the session's log gets for the round that just completed."""
        s = self.session
        nodes = []
        for node, _ in acc.contributors:
            sync, nbytes = counted.get(node, (BarrierSync(round=outcome.completed_round), 0))
            m = s.members.get(node)
            pace = sync.samples / sync.train_seconds if sync.train_seconds > 0 else 0.0
            nodes.append(
                NodeRound(
                    label=metric_label(m.name if m else "", node),
                    samples=int(s.weight_for(node, sync.samples)),
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

    def _aggregate(self, closing: int, epoch: int, acc: Accumulator | RobustAccumulator):
        """(new global state dict, its bytes, checkpoint info, None or (why the aggregate was
        refused, the suspects), the download change or None): the round's result, durable
        (steps 2 to 5); every node rebuilds exactly the new state dict."""
        assert self.global_sd is not None
        config = self.session.config
        extra = {"session": self.session.session_id, "aggregation": config.aggregation}
        if config.robust != "off" or config.clip > 0:
            extra["robust"] = f"{config.robust} clip={config.clip:g}"
        refused = None
        delta = None
        if acc.total_weight <= 0:
            # Every contributor trained nothing this round: the weights carry over unchanged
            # (and DiLoCo takes no outer step, so its momentum does not move them either).
            new_sd = self.global_sd
            extra["unchanged"] = "no samples trained this round"
        else:
            momentum = self.diloco.state_dict() if self.diloco is not None else None
            target = self.outer_step(self.global_sd, acc.mean())
            why = check_aggregate(self.global_sd, target, config.max_change)
            if why is not None:
                # Not published: the previous weights stay, and so do DiLoCo's momentum and
                # the download residual (the change is never encoded).
                if self.diloco is not None and momentum is not None:
                    self.diloco.load_state_dict(momentum)
                blamed = suspects(acc.norms, SUSPECT_FACTOR)
                refused = (why, blamed)
                new_sd = self.global_sd
                extra["unchanged"] = f"aggregate refused: {why}"
                extra["suspects"] = ",".join(blamed)
            else:
                new_sd, payload = self.download(self.global_sd, target)
                if payload is not None:
                    delta = (payload, sha256_bytes(payload))
        outer = self._outer_state()
        blob = to_bytes(new_sd)
        info = self.store.write(
            closing,
            blob,
            outer=outer,
            epoch=epoch,
            contributors=list(acc.contributors),
            now=self.clock(),
            extra=extra,
        )
        return new_sd, blob, info, refused, delta

    def download(self, global_sd: dict[str, Any], target: dict[str, Any]):
        """(3b) (the new global weights, the download change or None). With compression
        the new weights are the current ones plus the encoded change towards ``target`` (with
        the coordinator's error feedback), exactly what a node rebuilds from that change;
        without, they are ``target``."""
        if self.codec is None:
            return target, None
        enc = codec.encode(codec.difference(target, global_sd), self.codec, self.residual)
        return codec.apply(global_sd, enc.applied), enc.payload

    def _outer_state(self) -> bytes | None:
        """What the next rounds need besides the weights, saved with every checkpoint:
        DiLoCo's momentum and the download residual (None when there is neither)."""
        if self.diloco is None and self.codec is None:
            return None
        sd: dict[str, Any] = {}
        if self.diloco is not None:
            sd.update(self.diloco.state_dict())
        sd.update({RESIDUAL_PREFIX + k: v for k, v in self.residual.state_dict().items()})
        return to_bytes(sd)

    def _load_outer_state(self, sd: dict[str, Any]) -> None:
        residual = {
            k[len(RESIDUAL_PREFIX) :]: v for k, v in sd.items() if k.startswith(RESIDUAL_PREFIX)
        }
        self.residual.load_state_dict(residual)
        if self.diloco is not None:
            self.diloco.load_state_dict(
                {k: v for k, v in sd.items() if not k.startswith(RESIDUAL_PREFIX)}
            )

    def _publish(
        self,
        sd: Any,
        blob: bytes,
        info: CheckpointInfo,
        delta: tuple[bytes, str] | None = None,
    ) -> None:
        """``sd`` (the checkpoint ``info``, bytes ``blob``) is now the global weights;
        ``delta``: the encoded change from the weights published before, and its sha256."""
        base = self.current
        if base is None:
            delta = None
        self.global_sd = sd
        self.current = Weights(
            info.completed_round,
            info.epoch,
            info.sha256,
            blob,
            str(info.path),
            self.session.finished,
            delta[0] if delta is not None else None,
            delta[1] if delta is not None else "",
            base.completed_round if base is not None else -1,
            base.sha256 if base is not None else "",
        )
        self.acc = self.new_accumulator(sd)
        # Everyone waiting for these weights (or older ones) gets them now.
        for waited in [r for r in self._waiters if r <= info.completed_round]:
            fut = self._waiters.pop(waited)
            if not fut.done():
                fut.set_result(self.current)

    # ---- durability ----------------------------------------------------------------------
    async def save_session(self) -> None:
        """Write state.json; the snapshot is taken inside the lock, so saves never go back."""
        async with self._save_lock:
            await asyncio.to_thread(self.state.save_session, self.session.to_dict())

    def finish_message(self) -> Finish:
        """The Finish that tells a node the session is over (with the final weights)."""
        assert self.current is not None
        return Finish(
            round=self.current.completed_round,
            sha256=self.current.sha256,
            checkpoint=self.current.path,
        )


__all__ = ["RoundListener", "Rounds", "Weights"]
