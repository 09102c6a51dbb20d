"""The signed round manifest of the sharded data plane. Pure: no I/O, no clock.

In a sharded round each member cuts its encoded weight change into the plan's S pieces, one
per shard, and commits their sha256 to the coordinator (:class:`Commit`). The coordinator
fixes who contributes and with what weight, the shards' aggregators reduce, and the
coordinator signs a :class:`Manifest`: the round's books. Every node verifies it
(:func:`verify`) before it fetches and applies a single result piece.

What the manifest pins. Given the base weights (``base``, their sha256) and the shard plan
(``plan``, a sha256 naming codec, block, shard count and model), the shard result hashes pin
the round's new weights bit for bit: each result piece decodes, by the plan, into its slice
of the change, and applying a change is exact on every machine. A node that holds the base
and fetches pieces matching every ``result`` holds the same weights as every other node.
Each shard's ``inputs`` digest (:func:`inputs_digest`) pins what that shard reduced: its
reduction list, every contributor in the fixed order with its weight and the sha256 of its
piece of the shard. A computer checks that the manifest names exactly what it reduced, and
anyone holding the pieces can recompute the shard and compare. The list itself is not in
the manifest (a shard's computers get it in their orders); the manifest keeps only how many
uploads the round counted (``contributors``) and their total weight (``weight``).

Size. The manifest goes to every member every round, so it does not grow with the number of
contributors: only ``struck`` holds node ids. A manifest of a round with 1,024 contributors,
16 shards and no struck node signs to about 5 KB (``tests/test_manifest.py`` holds it under
8 KB), far under the protocol's frame limit; :attr:`Limits.max_blob` bounds it for any
manifest within the limits.

What a hostile node can and cannot do with it. Only the coordinator's Ed25519 identity key
signs manifests, so no node can forge one or change a byte of one: the signature covers a
domain prefix and the exact body bytes. A node that passes manifests on can replay an old
one, which is refused: :func:`verify` takes the session and the round the caller waits on.
A node can withhold a manifest or serve wrong result pieces; the first is the caller's
bounded wait, the second is caught by the piece hashes. Everything decoded is bounded: the
blob's size before decoding, then every count, hash, weight and size.

Wire layout (msgpack throughout)::

    blob   = [body: bin, sig: bin]          # Signed, an array of two
    body   = Manifest as a msgpack map, fields in declaration order (msgspec's encoding)
    sig    = Ed25519(coordinator key, DOMAIN + body)   # 64 bytes, DOMAIN b"drift/manifest/1\\0"

The signature covers the exact body bytes, so a verifier never re-encodes anything. Encoding
is deterministic (msgspec writes a Struct's fields in order, Ed25519 signatures are
deterministic), so the coordinator signing the same manifest twice gives the same blob.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from lightning_drift.auth import Identity, check_signature
from lightning_drift.errors import AuthError, ProtocolError
from lightning_drift.text import all_hex64, clean_text, is_hex64, short_id

DOMAIN = b"drift/manifest/1\0"  # what every manifest signature covers before the body
SIGNATURE_BYTES = 64  # an Ed25519 signature
KEY_BYTES = 32  # an Ed25519 public key


@dataclass(frozen=True)
class Limits:
    """What a manifest may hold. A verifier's bounds, not the session's settings: the defaults
    sit well above any session's (the coordinator's ``--max-nodes`` is 64 by default)."""

    max_nodes: int = 1024  # the contributors count, and struck nodes
    max_shards: int = 256
    max_piece: int = 1 << 34  # bytes of one result piece (16 GiB)
    max_session: int = 128  # characters of the session id
    max_reason: int = 512  # characters of ``unchanged``

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_shards", "max_piece", "max_session", "max_reason"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1, got {getattr(self, name)}")

    @property
    def max_blob(self) -> int:
        """The largest signed blob a manifest within these limits encodes to (msgpack, each
        part at its widest): the bound checked before a byte is decoded."""
        hex_str = 2 + 64  # str8 header, 64 characters
        number = 9  # an int64 or a float64 with its type byte
        # A shard: the map's header, its keys (index, primary, mirror, result, size, inputs:
        # 40 bytes with their headers), two numbers and four hashes.
        shard = 1 + 64 + 3 * number + 5 * hex_str
        text = 4 * (self.max_session + self.max_reason) + 10  # UTF-8 at 4 bytes a character
        return (
            1024  # the envelope, the signature, the map's keys, round, epoch, base, plan,
            # contributors, weight, the arrays' headers
            + text
            + self.max_nodes * hex_str  # struck
            + self.max_shards * shard
        )


DEFAULT_LIMITS = Limits()


# Commits and contributors are a thousand a round at a thousand nodes and live through the
# round, long enough for the garbage collector to move each to its oldest generation and then
# make its full passes come sooner. They hold only numbers, text and lists of those, so they
# cannot be part of a reference cycle: gc=False keeps them out of the collector's lists.


class Commit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False, gc=False):
    """What a node commits for a round before any piece moves: the sha256 of each piece of
    its encoded change, in shard order, and their sizes in bytes."""

    round: int  # the upload round
    base: str  # sha256 hex of the weights the change is against
    pieces: list[str]
    sizes: list[int]


class Contributor(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One upload counted in the round, in the reduction order: the coordinator's books
    (``books.py``) keep these; the manifest carries only their count, their total weight and
    each shard's :func:`inputs_digest` of them."""

    node: str  # the node id: its endpoint key, 64 hex digits
    weight: float  # finite, >= 0
    pieces: list[str]  # the piece hashes it committed, in shard order


class ShardEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One shard of the round: who serves its result, what that result is, and what it was
    reduced from."""

    index: int
    primary: str  # the aggregator's node id
    mirror: str = ""  # the second aggregator's node id; "" when none
    result: str  # sha256 hex of the shard's result piece ("" only in an unchanged round)
    size: int  # bytes of the result piece
    inputs: str  # inputs_digest of the shard's reduction list ("" only in an unchanged round)
    state: str = ""  # sha256 of what the shard carries on (reduce.state_bytes); "": nothing
    state_size: int = 0  # its bytes


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """The coordinator's signed books of one round (see the module docstring).

    ``round`` is the round the manifest completes: its contributors' upload round, and the
    base round of every node that applies it. ``unchanged`` is "" normally; when it says why,
    the round left the weights as ``base`` names them, and there is nothing to fetch.
    """

    session: str
    round: int
    epoch: int
    base: str  # sha256 hex of the round's starting weights
    plan: str  # sha256 hex naming the shard plan: codec, block, count, model
    contributors: int  # how many uploads the round counted (0 in an unchanged round)
    weight: float  # their total weight: finite, >= 0 (0 in an unchanged round)
    shards: list[ShardEntry]  # in shard order
    struck: list[str] = []  # node ids struck this round (a lying aggregator, ...)
    unchanged: str = ""

    def result_hashes(self) -> list[str]:
        """The sha256 of each shard's result piece, in shard order: what fetched pieces are
        checked against."""
        return [s.result for s in self.shards]


class Signed(msgspec.Struct, frozen=True, array_like=True):
    """The wire envelope: the manifest's msgpack body and the signature over DOMAIN + body."""

    body: bytes
    sig: bytes


INPUTS_DOMAIN = b"drift/inputs/1\0"  # what every inputs digest hashes before the list
_encoder = msgspec.msgpack.Encoder()
_signed_decoder = msgspec.msgpack.Decoder(Signed)
_manifest_decoder = msgspec.msgpack.Decoder(Manifest)


def piece_hash(data: bytes | bytearray | memoryview) -> str:
    """The sha256 hex of a piece: what a commit and a manifest name it by."""
    return hashlib.sha256(data).hexdigest()


def inputs_digest(reduction: Sequence[tuple[str, float, str]]) -> str:
    """The sha256 hex naming one shard's reduction list: ``(node id, weight, sha256 of the
    node's piece of the shard)`` for each contributor, in the reduction order.

    The digest is ``sha256(INPUTS_DOMAIN + msgpack([[node, weight, sha], ...]))``: msgpack
    writes each string with its length and each weight as a float64 (an int weight is taken
    as the float it equals), so the encoding is exact and unambiguous: another order, another
    bit of a weight or another character gives another digest."""
    body = _encoder.encode([[node, float(weight), sha] for node, weight, sha in reduction])
    return hashlib.sha256(INPUTS_DOMAIN + body).hexdigest()


def inputs_digests(
    nodes: Sequence[str], weights: Sequence[float], pieces: Sequence[Sequence[str]]
) -> list[str]:
    """:func:`inputs_digest` of several shards that the same contributors reduced: ``nodes``
    and ``weights`` in the reduction order, ``pieces[k]`` the sha256 of each one's piece of
    the k-th shard asked for. The coordinator names every shard of a round this way: each
    contributor's id and weight are encoded once, not once per shard, and nothing is built
    per contributor but bytes, which the garbage collector never scans.

    The bytes are :func:`inputs_digest`'s: msgpack writes an array as its header and then its
    items, so each triple is the fixarray header ``0x93`` and its three items encoded alone.
    """
    if len(weights) != len(nodes) or any(len(p) != len(nodes) for p in pieces):
        raise ValueError("inputs_digests wants one weight and one piece per node for each shard")
    head = INPUTS_DOMAIN + _array_header(len(nodes))
    encode = _encoder.encode
    prefixes = [
        b"\x93" + encode(node) + encode(float(w)) for node, w in zip(nodes, weights, strict=True)
    ]
    return [
        hashlib.sha256(head + b"".join(map(operator.add, prefixes, map(encode, p)))).hexdigest()
        for p in pieces
    ]


def _array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items, in its shortest form (as msgspec writes
    it): fixarray up to 15 items, array 16 up to 65,535, array 32 above."""
    if n <= 15:
        return bytes([0x90 | n])
    if n <= 0xFFFF:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


# ---- signing and verifying -------------------------------------------------------------------


def sign(manifest: Manifest, identity: Identity, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The signed blob of ``manifest``, for the coordinator to hand out. Checks it first
    (:func:`check`), so a manifest no verifier would take is never signed."""
    check(manifest, limits)
    body = _encoder.encode(manifest)
    blob = _encoder.encode(Signed(body=body, sig=identity.sign(DOMAIN + body)))
    if len(blob) > limits.max_blob:  # max_blob is derived to hold any checked manifest
        raise ProtocolError(
            f"manifest encodes to {len(blob)} bytes, over the {limits.max_blob}-byte bound; "
            "Limits.max_blob does not cover its own limits: fix its derivation"
        )
    return blob


def verify(
    blob: bytes | bytearray | memoryview,
    public_key: bytes,
    *,
    session: str,
    open_round: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Manifest:
    """The manifest in ``blob`` if the coordinator whose key is ``public_key`` signed it for
    ``session`` (and for ``open_round``, the round the caller waits on, when given) and it
    is within ``limits``; call it before fetching or applying any result piece.

    Raises ``AuthError`` when the signature is not the coordinator's or the manifest is of
    another session or round (a replay), ``ProtocolError`` when the blob is too large,
    malformed, or its content is out of bounds or inconsistent. The size is checked before
    anything is decoded, the signature before the body is.
    """
    if len(public_key) != KEY_BYTES:
        raise ValueError(f"a coordinator key is {KEY_BYTES} bytes, got {len(public_key)}")
    if len(blob) > limits.max_blob:
        raise ProtocolError(
            f"manifest blob of {len(blob)} bytes exceeds the {limits.max_blob}-byte bound "
            "(Limits.max_blob); refused unread: ask the coordinator for the round's manifest again"
        )
    try:
        signed = _signed_decoder.decode(blob)
    except msgspec.DecodeError as exc:
        raise ProtocolError(
            f"malformed manifest blob ({exc}): expected msgpack [body, signature]; "
            "ask the coordinator for the round's manifest again"
        ) from None
    if len(signed.sig) != SIGNATURE_BYTES:
        raise AuthError(
            f"manifest signature is {len(signed.sig)} bytes, expected {SIGNATURE_BYTES}; "
            "ask the coordinator for the round's manifest again"
        )
    try:
        check_signature(DOMAIN + signed.body, signed.sig, public_key)
    except AuthError:
        raise AuthError(
            f"manifest not signed by the coordinator {short_id(public_key.hex())} (the signature "
            "does not match: altered, or signed by another key); apply none of it and ask this "
            "coordinator for the round's manifest"
        ) from None
    try:
        manifest = _manifest_decoder.decode(signed.body)
    except msgspec.DecodeError as exc:
        raise _refused(f"the signed body is not a manifest ({exc})") from None
    _check_context(manifest, session=session, open_round=open_round)
    check(manifest, limits)
    return manifest


def _check_context(manifest: Manifest, *, session: str, open_round: int | None) -> None:
    """A genuine manifest of another session or round is a replay: refused as the token of
    another session is (``AuthError``)."""
    if manifest.session != session:
        raise AuthError(
            f"manifest is of session {clean_text(manifest.session, 40)!r}, this is {session!r} "
            "(a replay from another session); ask this session's coordinator for its manifest"
        )
    if open_round is not None and manifest.round != open_round:
        raise AuthError(
            f"manifest is of round {manifest.round}, the open round is {open_round} (a replay "
            "or a stale manifest); ask the coordinator for this round's manifest"
        )


# ---- the checks --------------------------------------------------------------------------------


def _refused(what: str) -> ProtocolError:
    return ProtocolError(
        f"manifest refused: {what}; apply none of its results (a coordinator that signs this is "
        "broken or of another version: run the same lightning-drift on every side)"
    )


def _shown(value: object) -> str:
    return clean_text(repr(value), 24)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hex64(value: object, field: str, what: str) -> None:
    if not is_hex64(value):
        raise _refused(f"{field} must be {what} (64 lowercase hex digits), got {_shown(value)}")


def _count(value: object, field: str, lo: int, hi: int | None = None, bound: str = "") -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < lo
        or (hi is not None and value > hi)
    ):
        top = f" … {hi}{f' (Limits.{bound})' if bound else ''}" if hi is not None else " or more"
        raise _refused(f"{field} is {_shown(value)}, not an integer {lo}{top}")


def _at_most(n: int, hi: int, field: str, bound: str) -> None:
    if n > hi:
        raise _refused(f"{field} holds {n} entries, over the bound of {hi} (Limits.{bound})")


def check(manifest: Manifest, limits: Limits = DEFAULT_LIMITS) -> None:
    """``ProtocolError`` naming the first field of ``manifest`` that is out of bounds or
    inconsistent; the coordinator calls it before signing, :func:`verify` after decoding."""
    m = manifest
    if not isinstance(m.session, str) or not 0 < len(m.session) <= limits.max_session:
        raise _refused(
            f"session must be 1 … {limits.max_session} characters (Limits.max_session), "
            f"got {_shown(m.session)}"
        )
    _count(m.round, "round", 0)
    _count(m.epoch, "epoch", 0)
    _hex64(m.base, "base", "the sha256 of the round's starting weights")
    _hex64(m.plan, "plan", "the sha256 naming the shard plan")
    _count(m.contributors, "contributors", 0, limits.max_nodes, "max_nodes")
    _weight(m.weight)
    _at_most(len(m.shards), limits.max_shards, "shards", "max_shards")
    _at_most(len(m.struck), limits.max_nodes, "struck", "max_nodes")
    if not isinstance(m.unchanged, str) or len(m.unchanged) > limits.max_reason:
        raise _refused(
            f"unchanged must be text of at most {limits.max_reason} characters "
            f"(Limits.max_reason), got {len(m.unchanged)} characters"
            if isinstance(m.unchanged, str)
            else f"unchanged must be text, got {_shown(m.unchanged)}"
        )
    _check_shards(m.shards, limits, changed=not m.unchanged)
    _check_nodes(m.struck, "struck")
    if not m.unchanged:
        _check_changed(m)
    if m.contributors == 0 and m.weight != 0:
        raise _refused(f"weight is {_shown(m.weight)}, but no upload counted (contributors is 0)")


def _weight(w: object) -> None:
    if not (isinstance(w, (int, float)) and not isinstance(w, bool)) or not (
        math.isfinite(w) and w >= 0
    ):
        raise _refused(f"weight is {_shown(w)}, not a finite number >= 0")


def _check_shards(shards: list[ShardEntry], limits: Limits, *, changed: bool) -> None:
    for i, s in enumerate(shards):
        field = f"shards[{i}]"
        if not _is_int(s.index) or s.index != i:
            raise _refused(f"{field}.index is {_shown(s.index)}: shards must be 0 … S-1 in order")
        _hex64(s.primary, f"{field}.primary", "a node id")
        if s.mirror != "":
            _hex64(s.mirror, f"{field}.mirror", 'a node id or ""')
            if s.mirror == s.primary:
                raise _refused(f"{field}.mirror is its primary {short_id(s.primary)}")
        if changed or s.result != "":
            _hex64(s.result, f"{field}.result", "the sha256 of the shard's result piece")
        _count(s.size, f"{field}.size", 0, limits.max_piece, "max_piece")
        if changed or s.inputs != "":
            _hex64(s.inputs, f"{field}.inputs", "the digest of the shard's reduction list")
        if s.state != "":
            _hex64(s.state, f"{field}.state", 'the sha256 of the shard\'s state, or ""')
        _count(s.state_size, f"{field}.state_size", 0, limits.max_piece, "max_piece")


def _check_nodes(nodes: list[str], field: str) -> None:
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        _hex64(node, f"{field}[{i}]", "a node id")
        if node in seen:
            raise _refused(f"{field}[{i}] {short_id(node)} is named twice")
        seen.add(node)


def _check_changed(m: Manifest) -> None:
    """A round that changes the weights has shards to fetch and contributors that weigh."""
    if not m.shards:
        raise _refused('shards is empty, but the round changes the weights (unchanged is "")')
    if m.contributors == 0:
        raise _refused('contributors is 0, but the round changes the weights (unchanged is "")')
    if m.weight <= 0:
        raise _refused("weight is 0: a change of nobody's weight")


# ---- commits -----------------------------------------------------------------------------------


def check_commit(
    commit: Commit, *, open_round: int, base: str, shards: int, sizes: list[int]
) -> None:
    """``ProtocolError`` naming what is wrong with a node's ``commit`` for ``open_round``:
    its round, its base (the sha256 of the open round's starting weights), the number of its
    pieces and sizes (``shards``), a hash that is not a sha256, or a size other than the
    plan's ``sizes``. The coordinator calls it when a commit arrives."""
    if len(sizes) != shards:
        raise ValueError(f"{len(sizes)} expected sizes for {shards} shards")
    if commit.round != open_round:
        raise ProtocolError(
            f"commit for round {_shown(commit.round)}, the open round is {open_round}; commit "
            "the pieces of this round's upload"
        )
    if commit.base != base:
        raise ProtocolError(
            f"commit base {_shown(commit.base)} is not the open round's base weights "
            f"({base[:16]}…); fetch this round's weights and train from them"
        )
    for field, got in (("pieces", len(commit.pieces)), ("sizes", len(commit.sizes))):
        if got != shards:
            raise ProtocolError(
                f"commit {field} holds {got} entries, the plan has {shards} shards; cut the "
                "change by this session's plan"
            )
    if not all_hex64(commit.pieces):  # one pass over them all; the loop names the first
        for j, h in enumerate(commit.pieces):
            if not is_hex64(h):
                raise ProtocolError(
                    f"commit pieces[{j}] is {_shown(h)}, not a sha256 (64 lowercase hex digits)"
                )
    if commit.sizes == sizes and set(map(type, commit.sizes)) <= {int}:
        return  # the plan's sizes, all ints (True == 1 and 1.0 == 1: the types are looked at)
    for j, (got_size, want) in enumerate(zip(commit.sizes, sizes, strict=True)):
        if not _is_int(got_size) or got_size != want:
            raise ProtocolError(
                f"commit sizes[{j}] is {_shown(got_size)} bytes, the plan's piece {j} is {want}; "
                "cut the change by this session's plan"
            )


__all__ = [
    "DEFAULT_LIMITS",
    "DOMAIN",
    "INPUTS_DOMAIN",
    "KEY_BYTES",
    "SIGNATURE_BYTES",
    "Commit",
    "Contributor",
    "Limits",
    "Manifest",
    "ShardEntry",
    "Signed",
    "check",
    "check_commit",
    "inputs_digest",
    "inputs_digests",
    "piece_hash",
    "sign",
    "verify",
]
