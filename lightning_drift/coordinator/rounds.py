"""One round's life on the coordinator: decode, aggregate, outer step, check, write, publish.

:class:`Rounds` holds the global weights and the round being built from the uploads (its
accumulator, and the lock that orders it against the completion). The upload core
(``uploads.py``) adds each counted upload to the accumulator; every round decision of the
session goes through :meth:`Rounds.consider`, and a round it says to complete is completed by
:meth:`Rounds.complete`, which returns what the server must carry out (``effects.py``): it
never calls back into the server.

A round's data goes through five steps:

1. **decode** (:meth:`Rounds.decode`): an upload's blob becomes a state dict, either the
   node's weights or its change from the current global weights (``delta``, dequantized by
   :func:`lightning_drift.codec.decode`; a change from other weights than those is left out
   first, :meth:`Rounds.stale_base`); its safetensors header was already checked against the
   model before the body was read (``boundary.UploadCheck``, :meth:`Rounds.upload_check`);
2. **aggregate** (``aggregation.Aggregation.new_accumulator``): the round's contributions
   are combined, each seen as a change against the current global weights: the exact
   weighted mean (``aggregate.Accumulator``), or a robust combination
   (``robust.RobustAccumulator``: trimmed mean, median, norm clip) when the session asks;
3. **outer step** (``Aggregation.outer_step``): ``mean`` takes the aggregate as the round's
   target, ``diloco`` takes a Nesterov step on the pseudo-gradient; the new global weights
   are the current ones moved to the target: exactly, or with ``--transfer-dtype
   bfloat16|int8`` by the encoded change towards it, the coordinator's own error feedback
   carried to the next round (``Aggregation.download``);
4. **check** (``aggregate.check_aggregate``): the new weights must be finite and within
   ``max_change`` of the old ones; a round that fails is *not published*: the previous global
   weights stay (and are checkpointed again as this round's), DiLoCo's momentum and the
   download residual are not moved, and the log names the cause and the nodes whose change
   stood out, each of which gets a strike (``Session.strike``: enough of them ban a node);
5. **write and publish**: the checkpoint (weights, outer state: DiLoCo's momentum and the
   download residual, manifest), then ``state.json``; then every node waiting at the barrier
   is answered with the new weights (:meth:`Weights.payload_for`: nothing, the encoded
   change, or the whole weights, by what the node holds), so every node holds exactly the
   checkpoint.

A completion that fails (disk full, out of memory) leaves the round's state uncertain: its
effects say so (``Effects.failed``), and the coordinator stops rather than hang every node; a
restart resumes from the last round whose state was saved (:meth:`Rounds.load`).

Heavy work (decoding, accumulating, aggregating, serializing, disk) runs in threads, so the
event loop keeps answering heartbeats meanwhile. One lock orders the accumulator against the
completion: an upload is added to the round it was accepted for, or to none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_drift import codec, modelspec
from lightning_drift.aggregate import Accumulator, from_bytes, to_bytes, validate_upload
from lightning_drift.checkpoint import CheckpointInfo, CheckpointStore
from lightning_drift.coordinator import effects
from lightning_drift.coordinator.aggregation import RESIDUAL_PREFIX, Aggregation
from lightning_drift.coordinator.boundary import UploadCheck
from lightning_drift.coordinator.effects import Effects
from lightning_drift.coordinator.logs import RoundRecord, round_record
from lightning_drift.coordinator.session import RoundDecision, Session
from lightning_drift.coordinator.sharded import DataPlane, ShardedRound, sharded_round
from lightning_drift.coordinator.state import StateDir
from lightning_drift.errors import ConfigError, DriftError, SessionError
from lightning_drift.fsutil import sha256_bytes, sha256_file
from lightning_drift.hardware import physical_memory
from lightning_drift.protocol import BarrierSync, Finish, Payload
from lightning_drift.robust import RobustAccumulator
from lightning_drift.text import short_id

log = logging.getLogger(__name__)

_UNKNOWN_MEMORY = 16 << 30  # assumed when the OS will not say how much memory there is
OPERATOR = "operator"  # the contributor of round 0 when `--init` seeded it
_EMPTY_SHA256 = sha256_bytes(b"")


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
    manifest: bytes = b""  # a sharded round's signed manifest: the members hold the change

    def payload_for(self, held_sha256: str) -> tuple[Payload, bytes, str]:
        """(payload kind, blob, its sha256) that gives these weights to a node holding the
        weights ``held_sha256`` ("" for none): nothing if it holds these already, the change
        if it holds their base, else the whole weights."""
        if held_sha256 and held_sha256 == self.sha256:
            return "same", b"", _EMPTY_SHA256
        if self.delta is not None and held_sha256 and held_sha256 == self.base_sha256:
            if self.manifest:  # the node fetches the change from the members that hold it
                return "manifest", self.manifest, sha256_bytes(self.manifest)
            return "delta", self.delta, self.delta_sha256
        return "weights", self.blob, self.sha256


class Rounds:
    """The global weights and the round being built; see the module docstring.

    ``record`` is given a :class:`~lightning_drift.coordinator.logs.RoundRecord` of every
    completed round (the session's log). ``clock`` times what happens after an await (a
    round's aggregation, a checkpoint's date).
    """

    def __init__(
        self,
        session: Session,
        store: CheckpointStore,
        state: StateDir,
        *,
        clock: Callable[[], float],
        record: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        self.session = session
        self.record = record
        # The open round's counted uploads: node -> (its BarrierSync, upload bytes).
        self.counted: dict[str, tuple[BarrierSync, int]] = {}
        self.store = store
        self.state = state
        self.clock = clock
        self.aggregation = Aggregation(session.config, store, clock)
        self.current: Weights | None = None  # the published global weights
        self.global_sd: dict[str, Any] | None = None  # the same, decoded
        self.acc: Accumulator | RobustAccumulator | ShardedRound | None = None  # the open round's
        self.sharded: DataPlane | None = None  # a sharded session's data plane (the server's)
        self._waiters: dict[int, asyncio.Future[Weights]] = {}  # completed round -> its weights
        self.lock = asyncio.Lock()  # the accumulator and the completion take turns
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

    async def seed(self, path: Path) -> str:
        """Round 0 from the operator's weights file (``--init``): they become the global
        weights, and the model every node must train (its fingerprint is pinned).
        Returns the event to log; ConfigError when the file is not a usable safetensors
        state dict."""
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
        async with self.lock:
            s.model_fingerprint = fp
            await self.write_initial(OPERATOR, sd, {"init": str(path)})
        return f"round 0: initial weights from {path} ({len(raw)} bytes)"

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
            self.aggregation.load_outer_state(from_bytes(outer))
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

    # ---- what the upload core asks ------------------------------------------------------
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

    async def published(self, completed_round: int) -> Weights:
        """The published weights of ``completed_round`` or a later round."""
        if self.current is not None and self.current.completed_round >= completed_round:
            return self.current
        fut = self._waiters.get(completed_round)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._waiters[completed_round] = fut
        return await asyncio.shield(fut)

    def release_waiters(self) -> int:
        """The session finished: every upload still waiting for a round answers with the
        final weights (no later round will ever complete). How many were waiting."""
        waiting = [f for f in self._waiters.values() if not f.done()]
        if self.current is not None:
            for fut in waiting:
                fut.set_result(self.current)
            self._waiters.clear()
        return len(waiting)

    async def write_initial(self, contributor: str, sd: Any, extra: dict[str, str]) -> int:
        """Round 0's checkpoint from ``sd``, durable and published (hold the lock)."""
        canon = await asyncio.to_thread(to_bytes, sd)
        outer = await asyncio.to_thread(self.aggregation.outer_state)
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
    def consider(self, decision: RoundDecision) -> bool:
        """Every round decision of the session comes here: True when the round is to be
        completed now (:meth:`complete`; at most one completion at a time)."""
        if decision.reason != self._last_reason:
            self._last_reason = decision.reason
            log.debug("round.decision %s", decision.reason)
        if decision.complete and not self._completing:
            self._completing = True
            return True
        return False

    async def complete(self, decision: RoundDecision) -> Effects:
        """Complete the open round (after :meth:`consider` said so; the caller has told the
        decision's reason): aggregate, write, publish, advance the session. Returns what the
        server must carry out: the events, the suspects' strikes, the completed round (and a
        stop its arrivals decided), the re-plans, a failure, the next decision."""
        s = self.session
        aggregating = decision.open_round
        fx = Effects()
        try:
            async with self.lock:
                s.close(aggregating)
                acc, self.acc = self.acc, None
                counted, self.counted = self.counted, {}
            assert acc is not None and self.global_sd is not None
            opened = s.round_started
            t0 = time.perf_counter()
            (new_sd, blob, info, refused, delta, manifest), more = await self._aggregate(
                aggregating, acc
            )
            fx.add(more)
            aggregation_s = time.perf_counter() - t0
            # Once the session has moved on, the next round is open and its uploads may come
            # in while the state file is written; holding the lock until the new global
            # weights (and with them the next accumulator) exist makes them wait for it.
            async with self.lock:
                outcome = s.advance(aggregating, self.clock())
                await self.save_session()
                self._publish(new_sd, blob, info, delta, manifest)
            log.info(
                "round.completed round=%d contributors=%d seconds=%.3f sha256=%s",
                aggregating,
                len(acc.contributors),
                time.perf_counter() - t0,
                info.sha256[:16],
            )
            if refused is not None:
                fx.add(self._refused(aggregating, refused, acc.contributors))
            if outcome.planned_epoch is not None or outcome.finished or outcome.stop:
                fx.events.append(outcome.reason)
            if self.record is not None:
                round_s = max(0.0, self.clock() - opened)
                self.record(
                    round_record(s, outcome, acc.contributors, counted, len(blob), round_s,
                                 aggregation_s)
                )  # fmt: skip
            fx.completed, fx.told = outcome, outcome.stop  # a stop the round's votes decided
            if not outcome.finished:
                fx.add(effects.replan(s, self.clock()))
        except Exception as exc:
            log.critical("round.failed round=%d error=%r", aggregating, exc)
            why = f"round {aggregating} could not be completed: {type(exc).__name__}: {exc}"
            return fx.add(Effects(failed=why))
        finally:
            self._completing = False
        fx.decision = s.check(self.clock())
        return fx

    async def _aggregate(
        self, aggregating: int, acc: Accumulator | RobustAccumulator | ShardedRound
    ) -> tuple[tuple[Any, bytes, CheckpointInfo, Any, Any, bytes], Effects]:
        """Steps 2 to 5 of the round: in a thread (the star), or by the members (sharded)."""
        s = self.session
        assert self.global_sd is not None
        if not isinstance(acc, ShardedRound):
            done = await asyncio.to_thread(
                self.aggregation.run, s.session_id, aggregating, s.epoch, acc, self.global_sd
            )
            return (*done, b""), Effects()
        assert self.sharded is not None
        return await sharded_round(
            self.sharded, self.aggregation, s, aggregating, acc, self.global_sd, self.clock
        )

    def _refused(
        self,
        aggregating: int,
        refused: tuple[str, list[str]],
        contributors: list[tuple[str, float]],
    ) -> Effects:
        """Round ``aggregating``'s aggregate was refused: say so, and strike its suspects."""
        why, blamed = refused
        names = ", ".join(short_id(n) for n in blamed) or "none stands out"
        fx = Effects(
            events=[
                f"round {aggregating} not published: its aggregate {why}; the global weights "
                f"stay round {aggregating - 1}'s; contributors "
                f"{', '.join(short_id(n) for n, _ in contributors)}; suspects: {names}"
            ]
        )
        for node in blamed:
            fx.add(
                effects.strike(
                    self.session, node, f"round {aggregating}'s aggregate {why}", self.clock()
                )
            )
        return fx

    def _publish(
        self,
        sd: Any,
        blob: bytes,
        info: CheckpointInfo,
        delta: tuple[bytes, str] | None = None,
        manifest: bytes = b"",
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
            manifest if delta is not None else b"",
        )
        if self.sharded is not None:
            self.acc = self.sharded.open(info.completed_round + 1, info.sha256, sd)
        else:
            self.acc = self.aggregation.new_accumulator(sd)
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


__all__ = ["OPERATOR", "RESIDUAL_PREFIX", "Rounds", "Weights"]
