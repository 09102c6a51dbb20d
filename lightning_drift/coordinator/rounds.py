"""One round's life on the coordinator: accumulate, outer step, checkpoint, publish.

:class:`Rounds` holds the global weights and the round being built from the uploads. The
server hands it each upload together with the session's verdict (:meth:`Rounds.take`), and
asks it which weights answer that upload (:meth:`Rounds.answer`); every round decision of the
session goes through :meth:`Rounds.consider`, which completes the round when it says so:

1. the session closes the round (no more uploads count for it),
2. the accumulated mean (or DiLoCo's outer step from it) becomes the new global weights,
3. the checkpoint is written (weights, outer-optimizer state, manifest), then ``state.json``,
4. the new weights are published: every node waiting at the barrier is answered with them.

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
from typing import Any, Protocol

from lightning_drift.aggregate import Accumulator, DiLoCo, from_bytes, to_bytes, validate_upload
from lightning_drift.checkpoint import CheckpointInfo, CheckpointStore
from lightning_drift.coordinator.session import (
    RoundDecision,
    RoundOutcome,
    Session,
    UploadVerdict,
    Verdict,
)
from lightning_drift.coordinator.state import StateDir
from lightning_drift.errors import ConfigError, DriftError, SessionError
from lightning_drift.fsutil import sha256_file
from lightning_drift.hardware import physical_memory
from lightning_drift.protocol import BarrierSync, Finish

log = logging.getLogger(__name__)

_UNKNOWN_MEMORY = 16 << 30  # assumed when the OS will not say how much memory there is


@dataclass(frozen=True)
class Weights:
    """The published global weights: the result of completed round ``completed_round``."""

    completed_round: int
    epoch: int
    sha256: str
    blob: bytes  # exactly the bytes of the checkpoint file ``path``
    path: str
    finished: bool = False  # the session's final weights


class RoundListener(Protocol):
    """What the server does when a round moves on (it owns the connections)."""

    def event(self, text: str) -> None:
        """A decision or a refusal worth showing the operator."""

    def round_completed(self, outcome: RoundOutcome) -> None:
        """New global weights are published (and maybe a new epoch planned, or the end)."""

    def failed(self, reason: str) -> None:
        """A round could not be completed; the coordinator must stop (see the module doc)."""


class Rounds:
    """The global weights and the round being built; see the module docstring.

    ``spawn`` runs a coroutine as a task the server owns (cancelled when it closes).
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
    ) -> None:
        self.session = session
        self.store = store
        self.state = state
        self.clock = clock
        self.listener = listener
        self.spawn = spawn
        config = session.config
        self.diloco: DiLoCo | None = None
        if config.aggregation == "diloco":
            self.diloco = DiLoCo(lr=config.outer_lr, momentum=config.outer_momentum)
        self.current: Weights | None = None  # the published global weights
        self.global_sd: dict[str, Any] | None = None  # the same, decoded
        self.acc: Accumulator | None = None  # the open round's sums
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
        if self.diloco is not None and outer is not None:
            self.diloco.load_state_dict(from_bytes(outer))
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
            case Verdict.EXCLUDED:
                self._left_out(node, sync.round, verdict.reason)
                return verdict
            case Verdict.OPEN:
                try:
                    sd = await asyncio.to_thread(from_bytes, blob)
                except SessionError as exc:
                    self.reject(node, sync.round, str(exc))
                    raise
                # Adding into the shared sums must run to its end even if this node's
                # connection drops meanwhile (which cancels its tasks): a half-added upload
                # would corrupt the round, and the sums and the session must agree on who
                # arrived.
                return await asyncio.shield(asyncio.ensure_future(self._accumulate(node, sync, sd)))
            case _:
                return verdict

    async def _accumulate(self, node: str, sync: BarrierSync, sd: Any) -> UploadVerdict:
        s = self.session
        async with self._lock:
            base = sync.base_round if sync.delta else -1
            # The round may have closed while the upload was decoded.
            verdict = s.upload(node, sync.round, self.clock(), base_round=base)
            if verdict.kind is Verdict.EXCLUDED:
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
            )
        log.info("barrier.arrived node=%s round=%d samples=%d", node[:8], sync.round, sync.samples)
        self.consider(decision)
        return verdict

    def reject(self, node: str, upload_round: int, reason: str) -> None:
        """A bad upload for ``upload_round``: the node is left out of it, which may complete."""
        self.listener.event(f"node {node[:8]} upload for round {upload_round} refused: {reason}")
        self.consider(self.session.reject(node, upload_round, reason, self.clock()))

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
        """The first start-up weights become round 0; False if another node's came first."""
        async with self._lock:
            if self.session.has_weights:
                return False
            sd = await asyncio.to_thread(from_bytes, blob)
            await asyncio.to_thread(validate_upload, sd, sd)
            canon = await asyncio.to_thread(to_bytes, sd)
            outer = None
            if self.diloco is not None:
                outer = await asyncio.to_thread(to_bytes, self.diloco.state_dict())
            now = self.clock()
            info = await asyncio.to_thread(
                self.store.write,
                0,
                canon,
                outer=outer,
                epoch=0,
                contributors=[(node, 1.0)],
                now=now,
                extra={"session": self.session.session_id},
            )
            self.session.initial(now)
            await self.save_session()
            self._publish(sd, canon, info)
        self.listener.event(f"round 0: start-up weights from node {node[:8]} ({len(canon)} bytes)")
        return True

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
            assert acc is not None and self.global_sd is not None
            self.listener.event(decision.reason)
            epoch = s.epoch
            t0 = time.perf_counter()
            new_sd, blob, info = await asyncio.to_thread(self._aggregate, closing, epoch, acc)
            # Once the session has moved on, the next round is open and its uploads may come
            # in while the state file is written; holding the lock until the new global
            # weights (and with them the next accumulator) exist makes them wait for it.
            async with self._lock:
                outcome = s.advance(closing, self.clock())
                await self.save_session()
                self._publish(new_sd, blob, info)
            log.info(
                "round.completed round=%d contributors=%d seconds=%.3f sha256=%s",
                closing,
                len(acc.contributors),
                time.perf_counter() - t0,
                info.sha256[:16],
            )
            if outcome.planned_epoch is not None or outcome.finished:
                self.listener.event(outcome.reason)
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

    def _aggregate(self, closing: int, epoch: int, acc: Accumulator):
        """(new global state dict, its bytes, checkpoint info): the round's result, durable."""
        assert self.global_sd is not None
        config = self.session.config
        extra = {"session": self.session.session_id, "aggregation": config.aggregation}
        if acc.total_weight <= 0:
            # Every contributor trained nothing this round: the weights carry over unchanged
            # (and DiLoCo takes no outer step, so its momentum does not move them either).
            new_sd = self.global_sd
            extra["unchanged"] = "no samples trained this round"
        elif self.diloco is not None:
            new_sd = self.diloco.step(self.global_sd, acc.mean())
        else:
            new_sd = acc.mean()
        outer = to_bytes(self.diloco.state_dict()) if self.diloco is not None else None
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
        return new_sd, blob, info

    def _publish(self, sd: Any, blob: bytes, info: CheckpointInfo) -> None:
        """``sd`` (the checkpoint ``info``, bytes ``blob``) is now the global weights."""
        self.global_sd = sd
        self.current = Weights(
            info.completed_round,
            info.epoch,
            info.sha256,
            blob,
            str(info.path),
            self.session.finished,
        )
        self.acc = Accumulator(sd)
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
