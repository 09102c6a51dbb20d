"""Steps 2 to 5 of a round on the coordinator, run in a thread: combine the contributions,
take the outer step, check the result, write the checkpoint (see ``rounds.py``'s docstring).

:class:`Aggregation` holds what the outer loop carries from round to round besides the
weights: DiLoCo's momentum and the download codec's error feedback (the residual), saved with
every checkpoint as the round's outer state and restored on a restart. The boundary is here
because this is the numerical heart of a round: it touches tensors and the checkpoint store,
never the event loop, the session's membership or a connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from lightning_drift import codec
from lightning_drift.aggregate import (
    Accumulator,
    DiLoCo,
    check_aggregate,
    outer_settings,
    to_bytes,
    weighed,
)
from lightning_drift.checkpoint import CheckpointInfo, CheckpointStore
from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.robust import RobustAccumulator, suspects

# A contributor of a round whose aggregate failed the check is named as its cause when its
# change is this many times the round's median change (or more).
SUSPECT_FACTOR = 10.0
# Keys of the download residual in a checkpoint's outer-state file (beside DiLoCo's momentum,
# which is keyed by the plain tensor names).
RESIDUAL_PREFIX = "download_residual/"

# (new global state dict, its bytes, checkpoint info, None or (why the aggregate was refused,
# the suspects), None or (the download change, its sha256))
RoundResult = tuple[
    dict[str, Any], bytes, CheckpointInfo, tuple[str, list[str]] | None, tuple[bytes, str] | None
]


class Aggregation:
    """The outer loop's state and the round's numerical steps (see the module docstring)."""

    def __init__(self, config: SessionConfig, store: CheckpointStore, clock: Callable[[], float]):
        self.config = config
        self.store = store
        self.clock = clock
        self.diloco: DiLoCo | None = None
        if config.aggregation == "diloco":
            self.diloco = DiLoCo(lr=config.outer_lr, momentum=config.outer_momentum)
        # Compressed downloads: the codec, and the error feedback the coordinator carries.
        down = config.transfer_dtype if config.download_dtype == "same" else config.download_dtype
        self.codec = down if config.transfer_dtype in codec.CODECS else None
        self.residual = codec.Residual()

    def new_accumulator(self, global_sd: dict[str, Any]) -> Accumulator | RobustAccumulator:
        """(2) What combines the next round's contributions: the exact streaming mean, or a
        robust combination when the session asks for one (it keeps every contribution)."""
        c = self.config
        if c.robust == "off" and c.clip <= 0:
            return Accumulator(global_sd)
        return RobustAccumulator(global_sd, method=c.robust, trim=c.trim, clip=c.clip)

    def outer_step(
        self, global_sd: dict[str, Any], mean: dict[str, Any], contributors: int, round_no: int
    ) -> dict[str, Any]:
        """(3) The weights round ``round_no`` aims at: the mean itself, or DiLoCo's outer step
        from the current global weights towards it (its pseudo-gradient is global - mean, the
        mean over the ``contributors`` only: a straggler left out adds nothing to it), with the
        lr ``aggregate.outer_settings`` gives for them."""
        if self.diloco is not None:
            c = self.config
            self.diloco.lr, self.diloco.momentum = outer_settings(
                contributors, round_no, c.outer_lr, c.outer_momentum, c.outer_warmup
            )
            return self.diloco.step(global_sd, mean)
        return mean

    def run(
        self,
        session_id: str,
        aggregating: int,
        epoch: int,
        acc: Accumulator | RobustAccumulator,
        global_sd: dict[str, Any],
    ) -> RoundResult:
        """(new global state dict, its bytes, checkpoint info, None or (why the aggregate was
        refused, the suspects), the download change or None): the round's result, durable
        (steps 2 to 5); every node rebuilds exactly the new state dict."""
        config = self.config
        extra = {"session": session_id, "aggregation": config.aggregation}
        if config.robust != "off" or config.clip > 0:
            extra["robust"] = f"{config.robust} clip={config.clip:g}"
        refused: tuple[str, list[str]] | None = None
        delta: tuple[bytes, str] | None = None
        if acc.total_weight <= 0:
            # Every contributor trained nothing this round: the weights carry over unchanged
            # (and DiLoCo takes no outer step, so its momentum does not move them either).
            new_sd = global_sd
            extra["unchanged"] = "no samples trained this round"
        else:
            momentum = self.diloco.state_dict() if self.diloco is not None else None
            target = self.outer_step(global_sd, acc.mean(), weighed(acc.contributors), aggregating)
            why = check_aggregate(global_sd, target, config.max_change)
            if why is not None:
                # Not published: the previous weights stay, and so do DiLoCo's momentum and
                # the download residual (the change is never encoded).
                if self.diloco is not None and momentum is not None:
                    self.diloco.load_state_dict(momentum)
                blamed = suspects(acc.norms, SUSPECT_FACTOR)
                refused = (why, blamed)
                new_sd = global_sd
                extra["unchanged"] = f"aggregate refused: {why}"
                extra["suspects"] = ",".join(blamed)
            else:
                new_sd, payload = self.download(global_sd, target)
                if payload is not None:
                    delta = (payload, sha256_bytes(payload))
        blob, info = self.write(aggregating, epoch, new_sd, list(acc.contributors), extra)
        return new_sd, blob, info, refused, delta

    def write(
        self,
        aggregating: int,
        epoch: int,
        new_sd: dict[str, Any],
        contributors: list[tuple[str, float]],
        extra: dict[str, str],
        outer: bytes | None | Literal["held"] = "held",
    ) -> tuple[bytes, CheckpointInfo]:
        """(5) Round ``aggregating``'s checkpoint: the weights ``new_sd`` and the outer state
        (``"held"``: the one held here), durable; (their bytes, the checkpoint's info)."""
        blob = to_bytes(new_sd)
        info = self.store.write(
            aggregating,
            blob,
            outer=self.outer_state() if outer == "held" else outer,
            epoch=epoch,
            contributors=contributors,
            now=self.clock(),
            extra=extra,
        )
        return blob, info

    def outer_of(self, momentum: dict[str, Any], residual: dict[str, Any]) -> bytes:
        """The outer state a sharded round's seats carry on (their shards' states joined), as
        :meth:`outer_state` saves it."""
        sd = dict(momentum) if self.diloco is not None else {}
        sd.update({RESIDUAL_PREFIX + k: v for k, v in residual.items()})
        return to_bytes(sd)

    def download(
        self, global_sd: dict[str, Any], target: dict[str, Any]
    ) -> tuple[dict[str, Any], bytes | None]:
        """(3b) (the new global weights, the download change or None). With compression
        the new weights are the current ones plus the encoded change towards ``target`` (with
        the coordinator's error feedback), exactly what a node rebuilds from that change;
        without, they are ``target``."""
        if self.codec is None:
            return target, None
        enc = codec.encode(codec.difference(target, global_sd), self.codec, self.residual)
        return codec.apply(global_sd, enc.applied), enc.payload

    def outer_state(self) -> bytes | None:
        """What the next rounds need besides the weights, saved with every checkpoint:
        DiLoCo's momentum and the download residual (None when there is neither)."""
        if self.diloco is None and self.codec is None:
            return None
        sd: dict[str, Any] = {}
        if self.diloco is not None:
            sd.update(self.diloco.state_dict())
        sd.update({RESIDUAL_PREFIX + k: v for k, v in self.residual.state_dict().items()})
        return to_bytes(sd)

    def load_outer_state(self, sd: dict[str, Any]) -> None:
        """Restore what :meth:`outer_state` saved (on a restart)."""
        residual = {
            k[len(RESIDUAL_PREFIX) :]: v for k, v in sd.items() if k.startswith(RESIDUAL_PREFIX)
        }
        self.residual.load_state_dict(residual)
        if self.diloco is not None:
            self.diloco.load_state_dict(
                {k: v for k, v in sd.items() if not k.startswith(RESIDUAL_PREFIX)}
            )


__all__ = ["RESIDUAL_PREFIX", "SUSPECT_FACTOR", "Aggregation", "RoundResult"]
