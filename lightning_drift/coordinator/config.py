"""The one table of every session setting and serve option: name, default, type, help, check.

:data:`SETTINGS` is where a default or a rule is written, once. Everything else reads it:

- :class:`SessionConfig` (what the session trains; saved in ``state.json``) and
  :class:`ServeOptions` (how this coordinator process runs) take their field defaults from the
  table and check their values against it when they are made (:func:`check`), so a bad value
  is refused the same way from Python, from a flag and from a config file.
- ``drift-coord serve`` makes one flag per row whose ``where`` is ``"flag"``, with the row's
  help and default (``--help`` shows ``[default: …]`` from :attr:`Setting.shown`), and reads
  rows whose ``where`` is ``"flag"`` or ``"file"`` from the ``coordinator:`` mapping of
  ``--config``. Rows with ``where="code"`` are for Python callers (and tests) only.

A row's ``default`` is in the unit the library uses (bytes, seconds, a ``Path``); ``parse``
turns what a person types (``"8GiB"``, ``"7d"``, MiB) into that unit. ``field`` names the
attribute of :class:`SessionConfig` or :class:`ServeOptions` when it differs from the row's
name (the flag and config-file key), e.g. ``token_ttl`` → ``token_ttl_s``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lightning_drift.errors import ConfigError
from lightning_drift.peers import split_peers
from lightning_drift.protocol import Aggregation, DataPlane, TransferDType
from lightning_drift.units import parse_duration, parse_size

# ---- how paces are averaged (the pace book, ``coordinator/pacebook.py``) -------------------
# Each is the weight of the newest value in an exponential moving average (the rest is the
# average so far). One table, so that no second copy of an average drifts from the first.
PACE_SMOOTHING = 0.5
"""Reported paces (``TrainProgress.samples_per_s``, bounded by the measured pace) → the pace
re-plans go by. Measured windows of a few seconds vary by ±10 % on a shared machine, and
following each one moved work back and forth every round (docs/benchmarks.md, wan.py)."""
MEASURED_SMOOTHING = 0.3
"""Measured paces (an upload's samples over the round's time) → the measured pace that
deadlines, bounds on reports and the scheduler's paces go by. One round is one sample of a
node's speed; 0.3 follows a machine that got busier within a few rounds. (This was written
twice: a literal 0.7/0.3 in the session and the scheduler's own ``ema=0.3`` over the same
measurements; the scheduler now reads the pace book's.)"""
ELAPSED_MIN = 0.1
"""Seconds: the shortest round time a pace is measured over (not an average: a bound)."""


Scope = Literal["session", "serve"]
StopPolicy = Literal["first", "quorum", "never"]
Where = Literal["flag", "file", "code"]
Mode = Literal["local", "internet"]
Robust = Literal["off", "trimmed", "median"]


@dataclass(frozen=True)
class Setting:
    """One row of the table. ``check(value)`` says why a value is wrong, or returns None."""

    name: str  # the flag (with dashes) and the `coordinator:` key (with underscores)
    default: Any  # in the library's unit
    kind: type  # what a flag or file value is read as before ``parse``
    help: str
    scope: Scope
    where: Where = "flag"
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    parse: Callable[[Any], Any] | None = None  # typed text → the library's unit
    attr: str = ""  # the dataclass field, when not ``name``
    shown: str = ""  # the default as --help shows it, when not ``str(default)``

    @property
    def field(self) -> str:
        return self.attr or self.name

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def shown_default(self) -> str:
        if self.shown:
            return self.shown
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


def _at_least(n: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= n else f"must be at least {n}, got {v}"


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be positive, got {v:g}"


def _keep(v: int) -> str | None:
    if v >= 2:
        return None
    return (
        f"must be at least 2, got {v}: after a crash between a checkpoint and the state file "
        "the previous checkpoint is the one a restart resumes from"
    )


def _not_negative(v: float) -> str | None:
    return None if v >= 0 else f"must be 0 or more, got {v:g}"


def _fraction(v: float) -> str | None:
    return None if 0 <= v < 0.5 else f"must be in [0, 0.5), got {v:g}"


def _shards(v: int) -> str | None:
    from lightning_drift.dataplane.plan import MAX_SHARDS

    return None if 1 <= v <= MAX_SHARDS else f"must be in [1, {MAX_SHARDS}], got {v}"


def _quorum(v: float) -> str | None:
    return None if 0 < v <= 1 else f"must be in (0, 1], got {v}"


def _peer_names(v: list[str]) -> str | None:
    try:
        split_peers(v)
    except ConfigError as exc:
        return f"has a bad entry: {exc}"
    return None


LOGGER_NAMES = ("csv", "tensorboard", "wandb", "mlflow", "none")


def _loggers(v: list[str]) -> str | None:
    for name in v:
        if name not in LOGGER_NAMES and "." not in name:
            return (
                f"must be {', '.join(LOGGER_NAMES)} or a logger's class path "
                f"(e.g. lightning.pytorch.loggers.CSVLogger), got {name!r}"
            )
    return None


def _mib(v: int) -> int:
    return int(v) << 20


def _not_negative_mib(v: int) -> str | None:
    return None if v >= 0 else "must be 0 (half of the RAM) or a size in MiB"


_S: Scope = "session"
_O: Scope = "serve"

SETTINGS: tuple[Setting, ...] = (
    # -- how this coordinator runs ----------------------------------------------------------
    Setting("port", 7842, int, "UDP port (fixed: keeps the address).", _O,
            shown="7842; on a restart, the stored one"),
    Setting("bind", None, str, "Bind address.", _O,
            shown="127.0.0.1 (local), 0.0.0.0 (internet); on a restart, the stored one"),
    Setting("mode", "local", str, "local (relays off) or internet.", _O,
            choices=("local", "internet"), shown="local; on a restart, the stored one"),
    Setting("relay", [], list, "Relay URL (repeatable).", _O,
            shown="n0's relays (internet mode); on a restart, the stored ones"),
    Setting("state_dir", Path("drift-state"), str, "Identity, tokens, session.", _O,
            parse=Path),
    Setting("checkpoint_dir", None, str, "Checkpoints.", _O, parse=Path,
            shown="STATE_DIR/checkpoints; on a restart, the stored one"),
    Setting("keep", 5, int, "Checkpoints kept (at least 2).", _O, check=_keep),
    Setting("max_model_mb", 0, int, "Largest start-up weights accepted, in MiB.", _O,
            parse=_mib, attr="max_model_bytes", check=_not_negative_mib,
            shown="0 (half the RAM)"),
    Setting("token_ttl", 7 * 86400.0, str,
            "Lifetime of the printed node/observer tokens: 24h, 7d...", _O,
            parse=parse_duration, attr="token_ttl_s", check=_positive, shown="7d"),
    Setting("peers", [], list,
            "Nodes let in without a token, by id: ID, ID@HOST:PORT or a ticket (a comma "
            "list, or repeat it); dialled when they have an address (internet: any id).",
            _O, parse=split_peers, check=_peer_names, shown="none; on a restart, the stored ones"),
    Setting("exit_when_done", True, bool, "Exit after the last round (or stay).", _O,
            shown="--exit-when-done"),
    Setting("logger", ["csv"], list,
            "Session logger (repeatable): csv, tensorboard, wandb, mlflow, none, or a "
            "Lightning logger's class path.", _O, check=_loggers, shown="csv"),
    Setting("log_dir", None, str, "Where the session logger writes.", _O, parse=Path,
            shown="CHECKPOINT_DIR/logs"),
    Setting("finish_grace_s", 120.0, float,
            "After the last round, how long to wait for connected nodes to say goodbye (a "
            "straggler left behind at the final deadline still fetches the final weights).",
            _O, where="code"),
    Setting("init", None, str,
            "Initial global weights (safetensors) for round 0: nodes' start-up weights must "
            "match their tensor table.", _O, parse=Path,
            shown="none (the first node's)"),
    Setting("min_upload_rate", 16 << 10, str,
            "An upload slower than this (bytes/s: 64KiB, 1MiB) is dropped.", _O,
            parse=parse_size, check=_positive, shown="16KiB"),
    Setting("upload_grace_s", 30.0, float,
            "Seconds an upload may take to start before --min-upload-rate applies.", _O,
            where="code", check=_not_negative),
    Setting("max_uploads", 4, int,
            "Uploads decoded and accumulated at once (bounds memory).", _O, where="code",
            check=_at_least(1)),
    Setting("tick_s", 0.5, float, "How often heartbeats and deadlines are checked (s).", _O,
            where="code", check=_positive),
    Setting("handshake_timeout_s", 30.0, float, "Join to NodeInfo, at most (s).", _O,
            where="code", check=_positive),
    # -- what the session trains (saved in state.json) ------------------------------------
    Setting("epochs", 10, int, "Epochs to train.", _S,
            shown="10; with --config, its trainer.max_epochs"),
    Setting("batch_size", 32, int, "Per-node batch size.", _S),
    Setting("sync_every", 100, int, "Steps per round for a node of average speed.", _S),
    Setting("min_nodes", 1, int, "Nodes needed to start.", _S),
    Setting("aggregation", "mean", str, "mean or diloco.", _S, choices=("mean", "diloco")),
    # Chosen by benchmarks/outer_sweep.py (docs/benchmarks.md): over tens of rounds, momentum
    # 0.9 is still building up (steps 1.3x to 5.8x the mean's over 16 rounds) and overshoots;
    # 0.6 settles within 3 rounds at lr / (1 - m) = 1.75x. The lr by the round's contributors:
    # aggregate.OUTER_LR, measured at 2, 4 and 8 nodes.
    Setting("outer_lr", 0.0, float,
            "DiLoCo outer learning rate; 0: by the round's number of contributors.", _S,
            check=_not_negative),
    Setting("outer_momentum", 0.6, float, "DiLoCo outer Nesterov momentum.", _S),
    Setting("outer_warmup", 0, int,
            "Rounds over which DiLoCo's outer lr ramps up linearly (0: none).", _S,
            check=_at_least(0)),
    Setting("quorum", 0.5, float, "Fraction of the expected nodes needed at the deadline.", _S,
            check=_quorum),
    Setting("stop_policy", "quorum", str,
            "When nodes ask to stop early (EarlyStopping, max_steps...): first, quorum or "
            "never.", _S, choices=("first", "quorum", "never")),
    Setting("stop_quorum", 0.5, float,
            "Fraction of the live nodes' delivered work whose nodes must ask to stop (stop "
            "policy quorum).", _S, check=_quorum),
    Setting("heartbeat_timeout", 15.0, float, "Seconds of silence before a node is lost.", _S,
            check=_positive),
    Setting("heartbeat_s", 5.0, float,
            "How often nodes ping (s); at most a third of heartbeat_timeout.", _S, where="file"),
    Setting("progress_every_s", 5.0, float, "How often nodes report progress (s).", _S,
            where="file"),
    Setting("deadline_margin", 1.5, float, "Straggler deadline: expected round time × this.",
            _S),
    Setting("deadline_floor", 10.0, float, "Straggler deadline never shorter than this (s).",
            _S),
    # No pace a node can show pushes a deadline further: the operator's bound on the clock.
    Setting("deadline_max", 3600.0, float,
            "Straggler deadline never longer than this after a round starts (s).", _S,
            check=_positive),
    Setting("dataset_size", 0, int, "Samples in the dataset.", _S, shown="the first node's"),
    Setting("seed", 0, int, "Seed of the epoch permutations.", _S),
    Setting("transfer_dtype", "float32", str,
            "float32 (whole weights), or compressed changes: bfloat16, int8, int4, int3, int2 "
            "(8, 4, 3, 2 bits per value), sign (one bit) or topk (the 4 largest of every 64 "
            "values at 2 bits).", _S,
            choices=("float32", "bfloat16", "int8", "int4", "int3", "int2", "sign", "topk")),
    # benchmarks/outer_sweep.py --download: the answer's error reaches every node alike, an
    # upload's is averaged over the nodes (docs/strategy.md, "Which aggregation and codec").
    Setting("download_dtype", "same", str,
            "The codec of the coordinator's answers (the new global weights' change): same "
            "(as --transfer-dtype), or a richer one than the uploads'.", _S,
            choices=("same", "bfloat16", "int8", "int4", "int3", "int2", "sign", "topk")),
    # benchmarks/outer_sweep.py --residual: with a low-bit codec, "weights" spares a node
    # training again towards what it could not send (docs/benchmarks.md, "outer_sweep.py").
    Setting("residual", "change", str,
            "Where a node keeps what its codec left out of an upload: change (added to its "
            "next one) or weights (it trains on from it; the final round ends it exact).", _S,
            choices=("change", "weights")),
    Setting("overlap", True, bool,
            "Nodes train on while a round is in flight (or every barrier blocks).", _S,
            shown="--overlap"),
    Setting("rebalance", True, bool,
            "Re-plan an epoch's rest when measured node speeds drift from the plan.", _S,
            shown="--rebalance"),
    Setting("min_vram", 0, str, "Refuse GPU nodes with less VRAM: 8GiB, 512MiB or bytes.", _S,
            parse=parse_size, shown="0 (no minimum)"),
    Setting("max_nodes", 64, int,
            "Live nodes at once (also bounds a robust round's memory).", _S,
            check=_at_least(1)),
    Setting("max_nodes_per_token", 16, int, "Live nodes joined with one token at once.", _S,
            check=_at_least(1)),
    Setting("forget_after", 3600.0, str,
            "Members that left or were lost this long ago leave the member list: 10m, 1h...",
            _S, parse=parse_duration, attr="forget_after_s", check=_positive, shown="1h"),
    Setting("robust", "off", str,
            "Robust aggregation: off (weighted mean), trimmed or median (coordinate-wise).",
            _S, choices=("off", "trimmed", "median")),
    Setting("trim", 0.2, float, "--robust trimmed: fraction dropped at each end (n ≥ 3: ≥ 1).",
            _S, check=_fraction),
    Setting("clip", 0.0, float,
            "Clip each node's change to this × the round's median change norm (0: off).", _S,
            check=_not_negative),
    Setting("data_plane", "star", str,
            "star: every change goes through the coordinator; sharded: members reduce shards "
            "of it and fetch the result from each other (docs/dataplane.md).", _S,
            choices=("star", "sharded")),
    Setting("shards", 8, int, "--data-plane sharded: shards a change is cut into.", _S,
            check=_shards),
    Setting("audit_every", 10, int,
            "--data-plane sharded: the coordinator recomputes one shard, drawn in secret, of "
            "one round in this many (0: never).", _S, check=_at_least(0)),
    Setting("max_change", 10.0, float,
            "A round whose aggregate moves a tensor by more than this × (its norm + √size) "
            "is not published (0: no bound).", _S, check=_not_negative),
    Setting("max_strikes", 3, int, "Failed uploads after which a node is excluded.", _S,
            check=_at_least(1)),
    Setting("lightning_config", "", str,
            "LightningCLI YAML handed to nodes (the rest of --config).", _S, where="code"),
)  # fmt: skip

SETTING: dict[str, Setting] = {s.name: s for s in SETTINGS}
OPTIONS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.where != "code")
_BY_FIELD: dict[str, Setting] = {s.field: s for s in SETTINGS}


def _default(name: str) -> Any:
    return SETTING[name].default


def check(s: Setting, value: Any) -> None:
    """Refuse ``value`` for setting ``s`` with a ConfigError naming its flag, or return."""
    if s.choices and value not in s.choices:
        raise ConfigError(f"{s.flag} must be {' or '.join(s.choices)}, got {value!r}")
    why = s.check(value) if s.check is not None and value is not None else None
    if why:
        raise ConfigError(f"{s.flag} {why}")


def read_option(s: Setting, raw: Any) -> Any:
    """A flag's or config file's value of ``s`` in the library's unit (not yet checked)."""
    if s.kind is list:
        items = [raw] if isinstance(raw, str) else list(raw)
        return s.parse(items) if s.parse is not None else items
    try:
        value = s.kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"option {s.name}={raw!r} is not a {s.kind.__name__}") from None
    return s.parse(value) if s.parse is not None else value


def _check_fields(obj: Any) -> None:
    for f in fields(obj):
        check(_BY_FIELD[f.name], getattr(obj, f.name))


@dataclass
class SessionConfig:
    """What a session trains and how its rounds are decided (persisted in state.json).

    Defaults and checks: the ``session`` rows of :data:`SETTINGS`."""

    epochs: int = _default("epochs")
    batch_size: int = _default("batch_size")
    sync_every: int = _default("sync_every")
    min_nodes: int = _default("min_nodes")
    aggregation: Aggregation = _default("aggregation")
    outer_lr: float = _default("outer_lr")
    outer_momentum: float = _default("outer_momentum")
    outer_warmup: int = _default("outer_warmup")
    quorum: float = _default("quorum")
    stop_policy: StopPolicy = _default("stop_policy")
    stop_quorum: float = _default("stop_quorum")
    heartbeat_timeout: float = _default("heartbeat_timeout")
    heartbeat_s: float = _default("heartbeat_s")
    progress_every_s: float = _default("progress_every_s")
    deadline_margin: float = _default("deadline_margin")
    deadline_floor: float = _default("deadline_floor")
    deadline_max: float = _default("deadline_max")
    dataset_size: int = _default("dataset_size")  # 0: adopt from the first admitted node
    seed: int = _default("seed")
    transfer_dtype: TransferDType = _default("transfer_dtype")
    download_dtype: str = _default("download_dtype")
    overlap: bool = _default("overlap")
    residual: str = _default("residual")
    rebalance: bool = _default("rebalance")
    min_vram: int = _default("min_vram")
    max_nodes: int = _default("max_nodes")
    max_nodes_per_token: int = _default("max_nodes_per_token")
    forget_after_s: float = _default("forget_after")
    robust: Robust = _default("robust")
    trim: float = _default("trim")
    clip: float = _default("clip")
    data_plane: DataPlane = _default("data_plane")
    shards: int = _default("shards")
    audit_every: int = _default("audit_every")
    max_change: float = _default("max_change")
    max_strikes: int = _default("max_strikes")
    lightning_config: str = _default("lightning_config")

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.min_nodes > self.max_nodes:
            # The start gate would wait for ever: more nodes than may ever be live at once.
            raise ConfigError(
                f"--min-nodes {self.min_nodes} is more than --max-nodes {self.max_nodes}: the "
                "first epoch would wait for ever; lower --min-nodes or raise --max-nodes"
            )
        if self.download_dtype != "same" and self.transfer_dtype == "float32":
            raise ConfigError(
                f"--download-dtype {self.download_dtype} compresses the answers' changes, but "
                "with --transfer-dtype float32 the nodes send and get whole weights: give "
                "--transfer-dtype a codec (int2, sign, ...) or leave --download-dtype same"
            )
        if self.data_plane == "sharded":
            _check_sharded(self)
        if self.deadline_floor > self.deadline_max:
            raise ConfigError(
                f"--deadline-floor {self.deadline_floor:g} is more than --deadline-max "
                f"{self.deadline_max:g}: no deadline could be both; lower the floor or raise "
                "the bound"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SessionConfig:
        """From ``state.json``'s ``config`` (keys this version does not know are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _check_sharded(c: SessionConfig) -> None:
    """What a sharded data plane cannot do, refused with the fix."""
    if c.transfer_dtype == "float32":
        raise ConfigError(
            f"--data-plane sharded cuts encoded changes into shards, but --transfer-dtype is "
            f"{c.transfer_dtype}: give --transfer-dtype int8, int4, int3, int2, sign, topk or "
            "bfloat16"
        )
    if c.download_dtype not in ("same", c.transfer_dtype):
        raise ConfigError(
            f"--data-plane sharded reduces and answers with one codec, but --download-dtype "
            f"{c.download_dtype} differs from --transfer-dtype {c.transfer_dtype}: leave "
            "--download-dtype same, or use --data-plane star"
        )
    if c.clip > 0:
        raise ConfigError(
            "--clip scales each node's change by its norm over the whole model, which no "
            "shard sees: with --data-plane sharded use --robust trimmed or median (or "
            "--data-plane star for --clip)"
        )


@dataclass
class ServeOptions:
    """How the coordinator process runs (as opposed to what the session trains).

    Defaults and checks: the ``serve`` rows of :data:`SETTINGS`; ``state_dir`` has no
    default here (``drift-coord serve`` uses ``./drift-state``)."""

    state_dir: Path
    checkpoint_dir: Path | None = _default("checkpoint_dir")  # None: STATE_DIR/checkpoints
    port: int = _default("port")  # fixed, so a restart keeps its address and old tokens work
    bind: str | None = _default("bind")  # None: 127.0.0.1 (local mode), 0.0.0.0 (internet)
    mode: Mode = _default("mode")
    relay: list[str] = field(default_factory=lambda: list(_default("relay")))
    peers: list[str] = field(default_factory=lambda: list(_default("peers")))
    exit_when_done: bool = _default("exit_when_done")
    logger: list[str] = field(default_factory=lambda: list(_default("logger")))
    log_dir: Path | None = _default("log_dir")  # None: CHECKPOINT_DIR/logs
    finish_grace_s: float = _default("finish_grace_s")
    max_uploads: int = _default("max_uploads")
    tick_s: float = _default("tick_s")
    keep: int = _default("keep")
    token_ttl_s: float = _default("token_ttl")
    handshake_timeout_s: float = _default("handshake_timeout_s")
    max_model_bytes: int = _default("max_model_mb")  # 0: half of this machine's memory
    init: Path | None = _default("init")  # round 0's weights; None: the first node's
    min_upload_rate: int = _default("min_upload_rate")  # bytes/s
    upload_grace_s: float = _default("upload_grace_s")

    def __post_init__(self) -> None:
        _check_fields(self)


def build(values: Mapping[str, Any]) -> tuple[SessionConfig, ServeOptions]:
    """The SessionConfig and ServeOptions that ``drift-coord serve`` runs with.

    ``values``: by field name, in the library's unit (missing ones take their defaults).
    Nodes ping every ``heartbeat_s``, and several pings must fit in ``heartbeat_timeout`` or a
    healthy node is declared lost between two of them: ``heartbeat_s`` is lowered to a third
    of the timeout when it is longer.
    """
    session = {f.name for f in fields(SessionConfig)}
    sc = {k: v for k, v in values.items() if k in session}
    if "heartbeat_timeout" in sc:
        sc["heartbeat_s"] = min(
            sc.get("heartbeat_s", _default("heartbeat_s")), sc["heartbeat_timeout"] / 3
        )
    serve = {k: v for k, v in values.items() if k not in session}
    return SessionConfig(**sc), ServeOptions(**serve)


__all__ = [
    "ELAPSED_MIN",
    "LOGGER_NAMES",
    "MEASURED_SMOOTHING",
    "OPTIONS",
    "PACE_SMOOTHING",
    "SETTING",
    "SETTINGS",
    "ServeOptions",
    "SessionConfig",
    "Setting",
    "StopPolicy",
    "build",
    "check",
    "read_option",
]
