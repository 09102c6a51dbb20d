"""The ``drift/0`` wire protocol: every message, the frame format and its limits. Pure: no I/O.

A control frame is a 4-byte big-endian unsigned length followed by that many bytes of msgspec
JSON encoding exactly one message of the tagged union :data:`Message` (tag field ``type``).
Frames longer than :data:`MAX_FRAME` are refused from the length prefix alone, before any of
the body is read. Weights never travel inside JSON: a :class:`BlobHeader` frame is followed by
exactly ``size`` raw bytes whose sha256 the receiver checks.

Schema evolution: new fields always get defaults; a field's type never changes; a field or a
message is never renamed. A peer that needs an incompatible change speaks a new ALPN
(``drift/1``).

Rounds. Several messages carry a ``round`` field, and it does not mean the same round in each
(the names are wire names and stay): a *completed* round (its global weights exist), the
*open* round (the one uploads contribute to: the last completed round + 1), or the round whose
global weights a node *holds*. Each message says which.
"""

from __future__ import annotations

import struct
from typing import Literal

import msgspec

from lightning_drift.errors import ProtocolError

ALPN = b"drift/0"
PROTOCOL_VERSION = 0
MAX_FRAME = 1 << 20  # 1 MiB: control messages only; weights go as blobs
HEADER = struct.Struct(">I")

Aggregation = Literal["mean", "diloco"]
TransferDType = Literal["float32", "bfloat16", "int8", "int4", "int3", "int2", "sign", "topk"]
# What follows a BarrierReady (see BarrierReady.payload).
Payload = Literal["weights", "delta", "same", "manifest", "chunks"]
DataPlane = Literal["star", "sharded"]
# A piece of the sharded data plane: a member's encoded change, a shard's reduced result, the
# state a shard carries on, or a chunk of the global weights a joining node fetches.
PieceKind = Literal["change", "result", "state", "weights"]


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=False, kw_only=True):
    """Base of every message. Unknown fields are ignored so that peers can add fields."""


class Join(_Msg, tag="join"):
    """Node → coordinator, first frame on the control stream (when the node dialled; when the
    coordinator dialled a node it was given by id, there is no Join: it sends Ping first)."""

    token: str  # "": a token-less join, admitted only for a node key on the --peers list
    node_key: str  # hex Ed25519 public key of the node's endpoint; must equal the QUIC peer id
    drift_version: str
    name: str = ""  # a human label (hostname by default)
    resume_round: int = -1  # the held round: whose global weights the node has, -1 if none
    observe: bool = False  # status only (any valid token): no membership, no NodeInfo


class Ping(_Msg, tag="ping"):
    """Coordinator → node after a good Join; also used as a heartbeat by either side."""

    session_id: str
    nonce: str


class DeviceInfo(msgspec.Struct, kw_only=True):
    name: str
    kind: str  # "cuda" | "rocm" | "mps" | "cpu" | "vulkan"
    vram_total: int = 0  # bytes; 0 when unknown or shared with the host
    vram_free: int = 0
    compute_capability: str | None = None
    index: int = 0
    usable: bool = True  # False for devices reported but not trainable (e.g. Vulkan only)


class NodeInfo(_Msg, tag="node_info"):
    """Node → coordinator, the answer to the handshake Ping."""

    nonce: str
    devices: list[DeviceInfo]
    train_device: str  # the torch device the node trains on, e.g. "cuda:0", "cpu"
    cpu: str
    cpu_count: int
    memory: int  # bytes of host RAM
    calibration: float  # measured GFLOP/s of the calibration matmul on the train device
    torch_version: str
    dataset_size: int
    model_fingerprint: str = ""  # sha256 over parameter names, shapes and dtypes
    hostname: str = ""
    name: str = ""  # the node's label, as in Join.name (a dialled node sends no Join)
    batch_size: int = 0  # the train loader's batch size; 0 when the loader does not say
    # Samples per optimizer step: batch_size × accumulate_grad_batches (automatic
    # optimization) or batch_size (manual); 0 when unknown. Shards come in whole steps of it.
    samples_per_step: int = 0
    # The node's data-plane endpoint (a ticket, or ID@HOST:PORT): where the session's other
    # members fetch pieces from it in a sharded session; "" when it runs none.
    data_peer: str = ""


class TrainConfig(_Msg, tag="train_config"):
    """Coordinator → node: how this session trains. Sent once after NodeInfo is accepted.

    The coordinator sends every field, so none has a default here: a session's defaults are
    defined once, in ``lightning_drift.coordinator.config``. (A field added later gets a
    default, as the schema rules say.)
    """

    session_id: str
    epochs: int
    batch_size: int
    sync_every: int  # optimizer steps per round for a node of average capability
    aggregation: Aggregation
    outer_lr: float
    outer_momentum: float
    transfer_dtype: TransferDType
    seed: int
    dataset_size: int
    round: int  # the last completed round; the node's next barrier (the open round) is round + 1
    epoch: int
    heartbeat_s: float
    progress_every_s: float
    has_weights: bool  # True when the coordinator already holds global weights
    min_nodes: int
    lightning_config: str  # LightningCLI YAML the coordinator hands to `drift join`
    # The completed round the session finishes on, once a stop has been decided (see
    # StopDecision); -1 while the session trains its epochs. Told again on every reconnect.
    stop_round: int = -1
    # Added later, so with a default: overlapped rounds (a barrier hands the upload to the
    # network and training goes on; only the epoch's last barrier blocks). Nodes follow it
    # unless their own setting says otherwise.
    overlap: bool = True
    data_plane: DataPlane = "star"  # "sharded": members aggregate shards (docs/dataplane.md)
    shards: int = 0  # the sharded plane's S
    robust: str = "off"  # what a sharded seat reduces with: off, trimmed or median
    trim: float = 0.2
    outer_warmup: int = 0  # rounds over which DiLoCo's outer lr ramps up (0: none)
    residual: str = "change"  # where a node keeps its upload residual: change or weights


class ShardAssignment(_Msg, tag="shard_assignment"):
    """Coordinator → node: which part of the epoch's permutation the node trains on.

    ``start``/``stop`` index the seeded permutation of the dataset for ``epoch`` (see
    ``scheduler.epoch_permutation``). The node spreads the shard over ``rounds`` barriers:
    barrier k of the epoch (1-based) falls after ``ceil(k * steps / rounds)`` optimizer steps,
    where ``steps`` is the number of optimizer steps the shard gives.

    A **re-plan** is a ShardAssignment for the epoch the node is training, sent unasked with a
    higher ``revision`` than the node holds: ``segments`` is then the node's whole work of the
    epoch, in order (what it has trained is a prefix of it; the rest may be shorter or longer
    than before), and the node spreads its remaining optimizer steps over its remaining
    barriers. When ``segments`` is empty the work is the one range ``[start, stop)``.
    """

    epoch: int
    start: int
    stop: int
    rounds: int
    first_round: int  # the open round of this node's first barrier in the epoch
    seed: int = 0
    share: float = 0.0
    steps_per_round: int = 0  # for display; the node derives its barrier points as above
    final: bool = False  # True for the last epoch of the session
    batch_size: int = 0  # the node's batch size the shard was cut for (0: not known)
    samples_per_step: int = 0  # the node's samples per optimizer step the shard was cut for
    segments: list[tuple[int, int]] = []  # [start, stop) ranges, in order; empty: [start, stop)
    revision: int = 0  # grows with every re-plan of the session; a node keeps the highest

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The node's work of the epoch as ``[start, stop)`` ranges of the permutation."""
        if not self.segments:
            return [(self.start, self.stop)]
        return [(int(a), int(b)) for a, b in self.segments]

    @property
    def size(self) -> int:
        """How many positions of the permutation the assignment holds."""
        return sum(max(0, b - a) for a, b in self.ranges)

    @property
    def work_per_round(self) -> float:
        """Positions one round of the assignment holds on average: its whole work (every
        segment) over its rounds. The one home of this figure: deadlines and measured paces
        both divide by it."""
        return self.size / max(1, self.rounds)


class ShardRequest(_Msg, tag="shard_request"):
    """Node → coordinator: ask for the assignment of ``epoch``."""

    epoch: int


class TrainProgress(_Msg, tag="train_progress"):
    """Node → coordinator every few seconds while training.

    ``round`` is the open round the node is training toward (its next barrier)."""

    round: int
    epoch: int
    step: int
    samples: int  # samples processed since the last barrier
    loss: float | None = None
    samples_per_s: float = 0.0  # measured over training steps only (not barriers, not applying)
    vram_used: int = 0
    vram_peak: int = 0
    epoch_samples: int = -1  # samples trained this epoch (positions of its assignment); -1: unknown
    data_bytes: int = 0  # piece bytes its data endpoint moved so far, both ways (sharded)


StopKind = Literal["callback", "max_steps"]


class StopRequest(_Msg, tag="stop_request"):
    """Node → coordinator on the control stream: this node's training wants to end.

    ``kind`` says why: ``"callback"`` (something set ``trainer.should_stop``, e.g.
    ``EarlyStopping``) or ``"max_steps"`` (the node reached ``Trainer(max_steps)`` and can
    train no further). Either is a vote the session's stop policy counts; a node at its
    ``max_steps`` that the policy does not follow is told to leave. The coordinator answers
    with a :class:`StopDecision`; asking again is harmless."""

    kind: StopKind = "callback"
    reason: str = ""  # for people: what asked, e.g. "EarlyStopping: val_loss did not improve"
    epoch: int = 0
    step: int = 0  # the node's optimizer steps in this fit


class StopDecision(_Msg, tag="stop_decision"):
    """Coordinator → node on the control stream: the session's answer to stop requests.

    With ``stop`` the session finishes on completed round ``round`` (the round open when the
    stop was decided): every node holds one final barrier for it as soon as it can, and that
    round's checkpoint is the final one. It is sent to every node when the stop is decided.
    Without ``stop`` the session trains on (``reason`` says by what policy and count), and it
    is sent to the asking node only: with ``leave`` (the answer to ``"max_steps"``) that node
    is to leave the session, its remaining work handed on to the others; otherwise its
    request was overruled and it trains on. (A node that does not know ``leave`` reads it as
    overruled; its ``max_steps`` ends its fit anyway.)"""

    stop: bool
    round: int = -1
    reason: str = ""
    leave: bool = False


class BarrierSync(_Msg, tag="barrier_sync"):
    """Node → coordinator, first frame of a barrier stream; a blob follows.

    ``round`` is the open round this upload contributes to, as the node knows it (stale if
    that round completed meanwhile). ``round`` 0 is the start-up sync: the coordinator adopts
    the uploaded weights as the initial global weights if it has none, and answers at once with
    the global weights (a node that knows the coordinator has weights, ``TrainConfig
    .has_weights``, may send an empty blob). An upload for a round that has already completed
    is discarded and answered at once.

    ``base_round`` and ``base_sha256`` name the weights the node holds: the held round (-1 for
    none) and the sha256 of its global weights; at the start-up sync, the sha256 of the
    node's own weights. A delta upload (``delta``) is the change from exactly those weights
    (``base_round`` is required then); the coordinator leaves it out of the round if they are
    not its current global weights. The coordinator answers with a compressed change
    (``BarrierReady.payload``) only when ``base_sha256`` names the weights it applies to.
    """

    round: int
    epoch: int = 0
    samples: int = 0  # samples processed since the last barrier (the aggregation weight)
    steps: int = 0
    loss: float | None = None
    delta: bool = (
        False  # True when the blob is a change from the base weights (lightning_drift.codec)
    )
    train_seconds: float = 0.0  # training time since the node's previous upload (no waiting)
    base_round: int = -1  # the held round: whose global weights the node holds (-1: none)
    base_sha256: str = ""  # sha256 of those weights ("" when the node does not keep them)
    epoch_samples: int = -1  # samples of the epoch trained when the upload was taken; -1: unknown
    whole: bool = False  # answer with the whole weights (not a chunk table: their fetch failed)


class BlobHeader(_Msg, tag="blob"):
    """Precedes exactly ``size`` raw bytes on the same stream."""

    size: int
    sha256: str  # hex
    kind: str = "weights"  # "weights" | "delta" | "checkpoint"
    format: str = "safetensors"
    dtype: str = ""
    meta: dict[str, str] = {}


class BarrierReady(_Msg, tag="barrier_ready"):
    """Coordinator → node on the barrier stream: the round is done; its global weights follow.

    ``round`` is the completed round whose global weights the node then holds, and ``sha256``
    is theirs (of the checkpoint file ``round-NNNNNN.safetensors``). What the blob that follows
    carries is ``payload``: ``"weights"``, those very bytes; ``"delta"``, the compressed change
    (``lightning_drift.codec``) from the global weights of ``base_round`` (the ones the node
    named in ``BarrierSync.base_sha256``) to these; ``"same"``, nothing (an empty blob): the
    weights the node named already are these."""

    round: int
    sha256: str  # of the global weights (the checkpoint file), whatever the payload
    contributed: bool = True  # False when this node's upload was not part of the round
    reason: str = ""
    epoch: int = 0
    finished: bool = False  # True when this was the session's final round
    payload: Payload = "weights"
    base_round: int = -1  # with payload "delta": the completed round the change applies to


class StatusRequest(_Msg, tag="status_request"):
    pass


class NodeStatus(msgspec.Struct, kw_only=True):
    """One member as the coordinator sees it; ``round`` is the last round its upload counted in."""

    node_id: str
    name: str = ""
    device: str = ""
    vram_total: int = 0
    share: float = 0.0
    samples_per_s: float = 0.0
    round: int = 0
    state: str = ""
    barrier_wait_s: float = 0.0
    loss: float | None = None
    samples: int = 0
    vram_used: int = 0  # bytes the node's training device holds now (its last report)
    vram_peak: int = 0  # the most it has held in this session
    stop_asked: bool = False  # the node has asked the session to stop
    seats: int = 0  # shards it holds a seat of (primary or mirror), in a sharded session
    data_bytes: int = 0  # piece bytes it moved, both ways, as it reports them


class SessionStatus(_Msg, tag="session_status"):
    """The session for an observer; ``round`` is the last completed round."""

    session_id: str
    state: str
    round: int
    epoch: int
    epochs: int
    aggregation: str = "mean"
    nodes: list[NodeStatus] = []
    checkpoint: str = ""
    started_at: float = 0.0
    lightning_config: str = ""  # the coordinator's LightningCLI YAML, for `drift join`
    stop_reason: str = ""  # why the session stops (or stopped) early, once decided
    data_plane: str = "star"
    shards: int = 0  # the sharded plane's S (0: star)
    coordinator_bytes: int = 0  # piece bytes the coordinator fetched (results, states, audits)


class Finish(_Msg, tag="finish"):
    """Coordinator → node: the session is over; ``round`` is the final completed round and
    ``sha256`` names its checkpoint."""

    round: int
    sha256: str = ""
    checkpoint: str = ""


class PiecePut(_Msg, tag="piece_put"):
    """Member → member on a new data-plane stream: one piece of a round; a blob follows.

    ``round`` is the upload round the piece belongs to: a ``"change"`` piece is part of a
    member's change for that round, a ``"result"`` piece the reduced shard of it. ``sha256``
    and ``size`` are the piece's; the receiver decides from this frame alone (who sends, which
    round, shard and kind, what size) before it reads any byte of the blob. Answered by
    :class:`PieceAck`."""

    round: int
    shard: int
    kind: PieceKind
    sha256: str  # lowercase hex of the piece's bytes; the BlobHeader that follows names it too
    size: int


class PieceAck(_Msg, tag="piece_ack"):
    """The receiver's answer to a :class:`PiecePut`: stored (``ok``), or refused and why."""

    ok: bool
    reason: str = ""


class PieceGet(_Msg, tag="piece_get"):
    """Member → member on a new data-plane stream: send me this piece (the fields name it as
    :class:`PiecePut` does). Answered by the piece as a blob, or by an ``Error`` (code
    ``no_piece``) when the server does not hold exactly that piece."""

    round: int
    shard: int
    kind: PieceKind
    sha256: str
    size: int


class PieceCommit(_Msg, tag="piece_commit"):
    """Node → coordinator, on its control stream, in a sharded session: the sha256 and size of
    each piece of its change for upload round ``round`` (in shard order), against the weights
    whose sha256 is ``base``. No piece travels to the coordinator: the pieces go to the
    shards' seats (``PiecePut``)."""

    round: int
    base: str
    pieces: list[str]
    sizes: list[int]


class ShardOrder(_Msg, tag="shard_order"):
    """Coordinator → node: compute shard ``shard`` of upload round ``round`` by reducing these
    contributors' pieces in this order (``nodes[i]`` with weight ``weights[i]`` and piece
    sha256 ``pieces[i]``), and report within ``deadline_s`` seconds."""

    round: int
    shard: int
    nodes: list[str]
    weights: list[float]
    pieces: list[str]
    deadline_s: float
    attempt: int = 1  # the round's fixes so far: a redo without a refused piece is the next
    base: str = ""  # sha256 of the global weights the round starts from (the seat holds them)
    # The shard's standing state (DiLoCo's momentum, the residual): of round ``state_round``,
    # sha256 ``state`` and ``state_size`` bytes, served by ``state_from`` (-1 / "": none yet).
    state_round: int = -1
    state: str = ""
    state_size: int = 0
    state_from: list[str] = []


class WeightsChunks(_Msg, tag="weights_chunks"):
    """Coordinator → a node joining a sharded session, as the blob of its start-up sync's
    answer (payload "chunks"): the global weights of ``round`` (sha256 ``sha256``) cut into
    ``chunks`` (sha256, size) in order, and the members that hold them (``holders``, node
    ids): the node fetches them from several at once (``Member.fetch_weights``)."""

    round: int
    sha256: str
    chunks: list[tuple[str, int]]
    holders: list[str]


class Directory(_Msg, tag="directory"):
    """Coordinator → node, in a sharded session: who is in the data plane. ``peers``: every
    member's (node id, data endpoint) the node may exchange pieces with; ``seated``: the node
    ids the seats are drawn among, with the seating's ``seed`` (hex) and its number
    ``seating``; ``gone``: members lost since (never dialled again)."""

    seating: int
    seed: str
    seated: list[str]
    peers: list[tuple[str, str]]
    gone: list[str] = []


class ShardReport(_Msg, tag="shard_report"):
    """Node → coordinator: what computing a shard gave. ``result``: the sha256 of the result
    piece ("" when there is none) and ``size`` its bytes; ``sums``: per tensor (name, squared
    L2 of how far it moved, squared L2 of its old values, non-finite count); ``norms2``: per
    contributor its change's squared norm over the shard; ``bad``: contributors whose pieces
    it refused, with why."""

    round: int
    shard: int
    result: str
    size: int
    sums: list[tuple[str, float, float, int]] = []
    norms2: list[tuple[str, float]] = []
    bad: list[tuple[str, str]] = []
    state: str = ""  # sha256 of the shard's next state (DiLoCo momentum, residual); "": none
    state_size: int = 0  # its bytes
    missing: list[str] = []  # contributors whose pieces it could not obtain: nothing computed
    attempt: int = 1  # the order's attempt it answers


class RoundManifest(_Msg, tag="round_manifest"):
    """Coordinator → node: a round's signed manifest (``dataplane/manifest.py``: the blob
    :func:`~lightning_drift.dataplane.manifest.verify` checks against the coordinator's key)."""

    round: int
    blob: bytes


class Error(_Msg, tag="error"):
    """Either direction, then the sender closes: ``code`` is machine-readable."""

    code: str
    message: str


class Bye(_Msg, tag="bye"):
    """Either direction: a clean goodbye."""

    reason: str = ""


Message = (
    Join
    | Ping
    | NodeInfo
    | TrainConfig
    | ShardAssignment
    | ShardRequest
    | TrainProgress
    | StopRequest
    | StopDecision
    | BarrierSync
    | BlobHeader
    | BarrierReady
    | StatusRequest
    | SessionStatus
    | Finish
    | PiecePut
    | PieceAck
    | PieceGet
    | PieceCommit
    | ShardOrder
    | ShardReport
    | Directory
    | WeightsChunks
    | RoundManifest
    | Error
    | Bye
)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Message] = msgspec.json.Decoder(Message)


def encode(msg: _Msg) -> bytes:
    """The JSON body of one message (no length prefix)."""
    return _encoder.encode(msg)


def encode_frame(msg: _Msg) -> bytes:
    """One whole frame: the 4-byte big-endian length, then the body. Refuses oversized bodies."""
    body = _encoder.encode(msg)
    if len(body) > MAX_FRAME:
        raise ProtocolError(
            f"{type(msg).__name__} encodes to {len(body)} bytes, over the {MAX_FRAME}-byte frame "
            "limit; send large data as a blob"
        )
    return HEADER.pack(len(body)) + body


def frame_length(prefix: bytes) -> int:
    """Parse a 4-byte length prefix; refuse it before the body is read if it is too large."""
    if len(prefix) != HEADER.size:
        raise ProtocolError(
            f"truncated frame: expected a {HEADER.size}-byte length prefix, got {len(prefix)} bytes"
        )
    (n,) = HEADER.unpack(prefix)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    if n == 0:
        raise ProtocolError("empty frame: a frame body must hold one message")
    return n


def decode(body: bytes | memoryview) -> Message:
    """Decode one frame body into its message, or raise ``ProtocolError`` saying what was wrong."""
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed frame body: {exc}") from None


def decode_frame(frame: bytes | memoryview) -> Message:
    """Decode one whole frame (prefix and body); the frame must hold exactly one message."""
    view = memoryview(frame)
    n = frame_length(bytes(view[: HEADER.size]))
    body = view[HEADER.size :]
    if len(body) < n:
        raise ProtocolError(f"truncated frame: length says {n} bytes, only {len(body)} present")
    if len(body) > n:
        raise ProtocolError(f"trailing junk: {len(body) - n} bytes after a {n}-byte frame")
    return decode(body)


def expect(msg: Message, kind: type[_Msg]) -> _Msg:
    """Return ``msg`` if it is a ``kind``; raise ``ProtocolError`` naming both otherwise.

    An ``Error`` from the peer is turned into ``ProtocolError`` carrying its code and message.
    """
    if isinstance(msg, kind):
        return msg
    if isinstance(msg, Error):
        raise ProtocolError(f"peer refused: {msg.code}: {msg.message}")
    raise ProtocolError(f"expected {kind.__name__}, got {type(msg).__name__}")
