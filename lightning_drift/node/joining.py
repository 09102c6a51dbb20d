"""Joining a session: how the node reaches its coordinator, the join, the session's settings.

:class:`Way` is how the node reaches its coordinator (a token, a peer's id, listening), checked
when the strategy is made, before anything touches the network. :class:`Joining` joins: it
calibrates the node, starts the runtime (:class:`~lightning_drift.node.runtime.NodeRuntime`),
takes the session's :class:`~lightning_drift.protocol.TrainConfig` (how weights travel,
overlap, the progress interval, the epochs), builds the round engine and holds the start-up
sync, and closes the runtime again.

The boundary: everything between a strategy's parameters and a joined node, without
Lightning: the fit loop is reached through :class:`~lightning_drift.node.epochwork.Loop` and
the module is a plain ``torch.nn.Module``. The runtime (and with it iroh) is imported when a
node joins, not when Lightning loads the strategy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightning_drift import __version__
from lightning_drift import protocol as p
from lightning_drift.auth import TOKEN_ENV, TOKEN_FILE_ENV, node_identity
from lightning_drift.errors import ConfigError
from lightning_drift.hardware import describe, node_info_fields
from lightning_drift.modelspec import table_of
from lightning_drift.node.epochwork import EpochWork, Loop
from lightning_drift.node.exchange import BarrierRecord, InFlight, RoundExchange
from lightning_drift.node.pace import PaceMeter
from lightning_drift.node.token import find_token, token_given
from lightning_drift.node.weights import GlobalWeights, Received, local_state, model_fingerprint
from lightning_drift.peers import parse_peer

if TYPE_CHECKING:
    from jsonargparse.typing import SecretStr

    from lightning_drift.node.runtime import Delivery, NodeRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Way:
    """How the node reaches its coordinator (``DriftStrategy``'s parameters of that name)."""

    token: str | None
    name: str
    mode: str | None = None
    relay_urls: tuple[str, ...] = ()
    coordinator_addr: str | None = None
    connect_timeout: float = 30.0
    reconnect_timeout: float = 300.0
    peer: str | None = None
    listen: str | None = None
    key_file: str | None = None

    def runtime(self, info: Callable[[], p.NodeInfo]) -> NodeRuntime:
        """The node's runtime along this way, not started."""
        from lightning_drift.node.runtime import NodeRuntime

        return NodeRuntime(
            self.token,
            info,
            name=self.name,
            mode=self.mode,
            relay_urls=self.relay_urls,
            via=(self.coordinator_addr,) if self.coordinator_addr else (),
            connect_timeout=self.connect_timeout,
            reconnect_timeout=self.reconnect_timeout,
            peer=self.peer,
            listen=self.listen,
            # Without a token the coordinator knows this node by its lasting key.
            secret=None if self.token else node_identity(self.key_file).seed,
        )


def ways_in(
    token: SecretStr | str | None,
    token_file: str | None,
    peer: str | None,
    listen: str | None,
    mode: str | None,
) -> str | None:
    """Check how the node is to reach its coordinator; the token it joins with, if any."""
    if listen is not None:
        if not peer or token_given(token, token_file):
            raise ConfigError(
                "DriftStrategy(listen=...) waits for the coordinator named by peer=... "
                "(its id) to dial in: give peer, and no token"
            )
        found = None  # a token in the environment is not this node's business
    else:
        # With peer=..., a node may join without a token (the coordinator lists its id).
        found = find_token(token, token_file=token_file)
        if not found and not peer:
            raise ConfigError(
                "DriftStrategy needs an invitation token: set "
                f"{TOKEN_ENV} (the token or a file holding it) or {TOKEN_FILE_ENV}, or pass "
                "DriftStrategy(token_file=...) or token=...; `drift-coord serve` prints one and "
                "writes it to STATE_DIR/node.token (or name the coordinator by id with "
                "peer=..., if it lists this node's id)"
            )
    if peer:
        parse_peer(peer)  # a malformed id fails here, not when the node joins
    if mode not in (None, "local", "internet"):
        raise ConfigError(
            f"mode must be 'local' or 'internet' (or None: the token's), not {mode!r}"
        )
    return found


@dataclass(frozen=True)
class Shape:
    """What the coordinator plans a node's work by: its dataset's size, its batch size and
    the samples of one optimizer step (batch size × accumulate_grad_batches), so that its
    shards are whole optimizer steps."""

    dataset_size: int
    batch_size: int = 0
    samples_per_step: int = 0


class Joining:
    """One node's membership of its session, from the join to the close.

    ``meter`` times the start-up and takes the session's progress interval unless
    ``progress_every`` is given; ``overlap`` (None: the session's) and ``sync_every`` shape
    the epoch's barriers; ``checkpoint_dir`` keeps each round's weights; ``on_delivery``
    sees every round trip. Set once joined: :attr:`runtime`, :attr:`config`,
    :attr:`exchange`."""

    def __init__(
        self,
        way: Way,
        meter: PaceMeter,
        *,
        calibration_seconds: float = 0.5,
        progress_every: float | None = None,
        overlap: bool | None = None,
        sync_every: int | None = None,
        checkpoint_dir: Path | None = None,
        on_delivery: Callable[[Delivery[Received]], None] | None = None,
    ) -> None:
        self.way, self.meter = way, meter
        self.calibration_seconds, self.progress_every = calibration_seconds, progress_every
        self.overlap, self.sync_every = overlap, sync_every
        self.checkpoint_dir, self.on_delivery = checkpoint_dir, on_delivery
        self.runtime: NodeRuntime | None = None
        self.config: p.TrainConfig | None = None
        self.exchange: RoundExchange | None = None
        self.node_key = ""

    @property
    def base_round(self) -> int:
        """The round of the verified global weights the module is based on (-1: none)."""
        return self.exchange.base_round if self.exchange is not None else -1

    @property
    def round_in_flight(self) -> InFlight | None:
        """The barrier whose round has not been applied yet, if any."""
        return self.exchange.in_flight if self.exchange is not None else None

    def join(
        self,
        module: torch.nn.Module,
        loop: Loop,
        device: torch.device,
        shape: Shape,
        resumed_session: str = "",
        history: list[BarrierRecord] | None = None,
    ) -> EpochWork:
        """Join the session, take its settings, and hold the start-up sync (round 0): every
        node starts from the same weights. ``resumed_session``: the session of the
        checkpoint the fit resumed from, if any; ``history`` gets a record per round applied.
        The node's epochs from here on."""
        with self.meter.start_up():
            hw = node_info_fields(device, seconds=self.calibration_seconds)
            fingerprint = model_fingerprint(module)

            def info() -> p.NodeInfo:
                return p.NodeInfo(
                    nonce="",
                    dataset_size=shape.dataset_size,
                    model_fingerprint=fingerprint,
                    batch_size=shape.batch_size,
                    samples_per_step=shape.samples_per_step,
                    **hw,
                )

            self.runtime = runtime = self.way.runtime(info)
            self.node_key = runtime.node_key
            config = runtime.start()
            work = self._take_config(config, module, loop, resumed_session, history)
            if resumed_session and resumed_session != config.session_id:
                # The checkpoint's loop counters count another session's epochs: this one
                # trains from its own epoch on (the shard asked for next is that epoch's).
                was = loop.jump_to_epoch(config.epoch)
                if was != config.epoch:
                    log.warning(
                        "resumed at epoch %d of another session; this session is at epoch %d: "
                        "training goes on from there",
                        was,
                        config.epoch,
                    )
            self._unused_devices(hw, device)
            overridden = loop.keep_fitting(config.epochs)
            if overridden is not None:
                log.warning(
                    "epochs: the session trains %d epochs; Trainer(max_epochs=%s) is overridden",
                    config.epochs,
                    overridden,
                )
            self.meter.restart()  # whatever a Tuner's local fit counted is not this session's
            work.sync(p.BarrierSync(round=0, epoch=loop.epoch))
        # Progress reports measure training from here on.
        self.meter.restart()
        return work

    def _take_config(
        self,
        config: p.TrainConfig,
        module: torch.nn.Module,
        loop: Loop,
        resumed_session: str,
        history: list[BarrierRecord] | None,
    ) -> EpochWork:
        """The session's settings: how weights travel, overlap, reports."""
        assert self.runtime is not None
        self.config = config
        weights = GlobalWeights(config.transfer_dtype, in_weights=config.residual == "weights")
        self.runtime.hold(weights.held, lambda: table_of(local_state(module)))
        self.exchange = RoundExchange(
            self.runtime,
            weights,
            module,
            self.meter,
            has_weights=config.has_weights,
            checkpoint_dir=self.checkpoint_dir,
            on_delivery=self.on_delivery,
        )
        if resumed_session and resumed_session != config.session_id:
            log.warning(
                "the checkpoint resumed from belongs to session %s, not to this session (%s): "
                "its weights are replaced at the start-up sync; its optimizer state is kept",
                resumed_session,
                config.session_id,
            )
        if self.progress_every is None and config.progress_every_s > 0:
            self.meter.progress_every = config.progress_every_s
        return EpochWork(
            self.exchange,
            self.meter,
            loop,
            self.runtime,
            overlap=config.overlap if self.overlap is None else self.overlap,
            sync_every=self.sync_every,
            history=history,
        )

    @staticmethod
    def _unused_devices(hw: dict[str, Any], device: torch.device) -> None:
        if any(not d.usable for d in hw["devices"]):
            # Say plainly which devices cannot train (e.g. Vulkan-only GPUs) and what does.
            log.warning(
                "devices found but not used for training:\n%s",
                describe(hw["devices"], str(device)),
            )

    def checkpoint_entry(self) -> dict[str, Any]:
        """The ``"drift"`` entry of a Lightning checkpoint: which round's global weights the
        node's are based on (``round``) in which session. ``samples_since_round`` is 0 when
        the weights are exactly that round's (saved at a barrier or an epoch's end); otherwise
        they are local, mid-round weights."""
        inflight = self.round_in_flight
        return {
            "round": self.base_round,
            "session": self.config.session_id if self.config else "",
            "samples_since_round": self.meter.samples + (inflight.sync.samples if inflight else 0),
            "version": __version__,
        }

    def close(self, reason: str) -> None:
        """Drop the round in flight and leave the session (the runtime says goodbye)."""
        if self.exchange is not None:
            self.exchange.drop()
        if self.runtime is not None:
            self.runtime.close(reason)
            self.runtime = None


__all__ = ["Joining", "Shape", "Way", "ways_in"]
