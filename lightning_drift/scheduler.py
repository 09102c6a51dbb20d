"""Paces → data shards and work per round. Pure: no I/O, no clock.

Every epoch the dataset is visited in a seeded permutation (:func:`epoch_permutation`), the
same on every node. The scheduler cuts the *positions* ``range(dataset_size)`` of that
permutation into one contiguous shard per node, sized in proportion to the node's pace, so
that a node three times as fast gets three times the samples and all nodes reach each
barrier at about the same time.

Paces, and why their units are coherent
---------------------------------------
A node's pace is its expected training throughput in **samples per second**:

- Once the coordinator has measured the node's pace (the pace book,
  ``coordinator/pacebook.py``: an average of what its uploads took; the caller passes those
  paces in), its pace is that measured pace. Calibration no longer matters for it.
- Before that, its pace is its calibration (:func:`calibrated_pace`, GFLOP/s of a matmul
  benchmark) times a conversion factor ``k`` in samples per GFLOP, estimated from the nodes
  that have both: ``k = sum(measured) / sum(calibration)`` over those nodes. While no node is
  measured yet, ``k = 1``: every pace is then in calibration units, which is fine because
  only the ratios between paces are used.

So a fresh node joining a running session is placed on the same scale as the measured ones
instead of its raw GFLOP/s being compared with other nodes' samples/s.

A calibration is what a node says about itself: an unmeasured node's pace is kept within a
factor ``trust`` of the median measured pace (of the median calibration while nobody is
measured), so a node claiming a huge calibration gets at most ``trust`` times the median
node's share, and one claiming a tiny one cannot stretch a round's deadline without bound.
The measured paces come from the coordinator's own measurements, not from what nodes report;
the scheduler averages nothing itself (one average of one measurement, in the pace book).

Shards in whole optimizer steps
-------------------------------
A node says how many samples one of its optimizer steps takes (``NodeInfo.samples_per_step``:
its batch size × ``accumulate_grad_batches``) and its batch size. Its shard is then a whole
number of those steps, so every batch it trains is a full one, as in a plain run of the same
program. The epoch's remainder (fewer samples than a step) goes to one node as the tail of its
shard, the way a plain run ends its epoch: whole batches, then at most one partial batch, and
only a partial batch of ``dataset_size % batch_size`` samples, which a plain run of that node's
program has too (and drops with ``drop_last``). Whatever of the remainder no node's plain run
would have (possible only when nodes use different batch sizes; always fewer samples than
one batch) is left out of that epoch; the next epoch's permutation puts other samples there. A
node that does not say (``samples_per_step`` 0) gets a shard to the sample, as before.

Rounds are planned in optimizer steps too: an epoch has about ``dataset_size / (sum of the
nodes' samples per step × sync_every)`` rounds, and never more than the fewest optimizer steps
any (reporting) node's shard gives, so no two barriers of a node fall on one step.

The device's name, VRAM and compute capability from ``NodeInfo`` do not enter the pace on
purpose: a table of GPU names would age, and the calibration benchmark measures what those
fields only predict, on the device and software stack actually used (thermal limits, a
shared GPU, a CPU build of torch). VRAM is used as a gate (``min_vram``), and the device kind
gives the fallback pace when a node sends no calibration.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, Literal

import msgspec
import torch

from lightning_drift.coordinator.segments import Segment, Segments, normalize, total
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.protocol import DeviceInfo, NodeInfo
from lightning_drift.robust import lower_median
from lightning_drift.text import short_id
from lightning_drift.units import format_gib

log = logging.getLogger(__name__)

# Fallback calibration, GFLOP/s, when a node reports 0 (benchmark skipped or failed). Rough
# fp32 matmul throughput of a mid-range device of each kind; only the ratios matter.
FALLBACK_GFLOPS: dict[str, float] = {
    "cuda": 10_000.0,
    "rocm": 8_000.0,
    "mps": 2_000.0,
    "vulkan": 1_000.0,
}
FALLBACK_CPU_GFLOPS_PER_CORE = 20.0

_STATE_VERSION = 1
NO_PACES: Mapping[str, float] = {}  # measured paces (samples/s) when none are known


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits a dataset of ``n`` samples (int64, length n).

    Every node and the coordinator call this with the same arguments and get the same tensor,
    on any machine: it uses a CPU ``torch.Generator`` seeded from ``(seed, epoch)``.
    """
    if n < 0:
        raise ConfigError(f"dataset size must be >= 0, got {n}")
    # Mix seed and epoch through sha256 so that (seed, epoch) pairs never collide the way
    # seed + epoch would, and the result fits the generator's 64-bit seed.
    digest = hashlib.sha256(f"drift-perm:{int(seed)}:{int(epoch)}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))
    return torch.randperm(n, generator=gen, dtype=torch.int64, device="cpu")


def train_device_info(info: NodeInfo) -> DeviceInfo | None:
    """The :class:`DeviceInfo` of the device ``info.train_device`` names, or None (e.g. CPU).

    ``"cuda:1"`` matches a device of kind ``cuda`` or ``rocm`` (ROCm builds of torch also say
    ``cuda``) with index 1; ``"mps"`` matches kind ``mps``.
    """
    kind, _, index_s = info.train_device.partition(":")
    index = int(index_s) if index_s.isdigit() else 0
    kinds = {"cuda": ("cuda", "rocm"), "mps": ("mps",), "xpu": ("xpu",)}.get(kind, ())
    for dev in info.devices:
        if dev.kind in kinds and dev.index == index:
            return dev
    return None


def calibrated_pace(info: NodeInfo) -> float:
    """The node's capability before anything was measured, in GFLOP/s (always > 0).

    Formula: ``info.calibration`` (the measured GFLOP/s of the calibration matmul on the train
    device) when it is a positive finite number; otherwise a fallback by device kind:
    :data:`FALLBACK_GFLOPS` for a GPU kind, ``FALLBACK_CPU_GFLOPS_PER_CORE * cpu_count`` for
    a CPU. The scheduler converts it to samples/s (see the module docstring).
    """
    if math.isfinite(info.calibration) and info.calibration > 0:
        return float(info.calibration)
    dev = train_device_info(info)
    if dev is not None and dev.kind in FALLBACK_GFLOPS:
        return FALLBACK_GFLOPS[dev.kind]
    kind = info.train_device.partition(":")[0]
    if kind == "cuda":
        return FALLBACK_GFLOPS["cuda"]
    if kind in FALLBACK_GFLOPS:
        return FALLBACK_GFLOPS[kind]
    return FALLBACK_CPU_GFLOPS_PER_CORE * max(1, info.cpu_count)


class Shard(msgspec.Struct):
    """One node's part of an epoch: positions ``[start, stop)`` of the epoch's permutation, or,
    when ``segments`` is set (the rest of a shard after the epoch was re-planned), those ranges
    in order.

    ``share`` is the node's fraction of the total pace when the epoch was planned;
    ``batch_size`` and ``samples_per_step`` are the node's, which the shard was cut for (0:
    not known).
    """

    node: str
    start: int
    stop: int
    share: float
    steps_per_round: int
    batch_size: int = 0
    samples_per_step: int = 0
    segments: Segments = ()

    @property
    def ranges(self) -> Segments:
        return self.segments or ((self.start, self.stop),)

    @property
    def size(self) -> int:
        return total(self.ranges)

    @classmethod
    def of(
        cls,
        node: str,
        segments: Sequence[Segment],
        share: float,
        steps_per_round: int = 0,
        *,
        batch_size: int = 0,
        samples_per_step: int = 0,
    ) -> Shard:
        """A shard holding ``segments`` (one range is kept as plain ``start``/``stop``)."""
        segs = normalize(segments)
        a, b = segs[0] if segs else (0, 0)
        return cls(
            node,
            a,
            b,
            share,
            steps_per_round,
            batch_size=batch_size,
            samples_per_step=samples_per_step,
            segments=segs if len(segs) > 1 else (),
        )


class EpochPlan(msgspec.Struct):
    """The shards of one epoch; its barriers are rounds ``first_round .. first_round+rounds-1``.

    ``batch_size``, ``dataset_size`` and ``total_pace`` (the sum of the planned nodes'
    paces) are recorded so that :func:`plan_late` can place a late joiner.
    """

    epoch: int
    rounds: int
    first_round: int
    shards: dict[str, Shard]
    batch_size: int = 0
    dataset_size: int = 0
    total_pace: float = msgspec.field(default=0.0, name="total_score")

    @property
    def last_round(self) -> int:
        return self.first_round + self.rounds - 1


def optimizer_steps(size: int, batch_size: int, samples_per_step: int = 0) -> int:
    """Optimizer steps one epoch over a shard of ``size`` samples gives a node that trains in
    batches of ``batch_size`` and steps every ``samples_per_step`` samples (0: every batch).

    Lightning steps once per ``accumulate_grad_batches`` batches, and once more for the
    epoch's last, shorter group: ``ceil(ceil(size / batch_size) / accumulate)``.
    """
    if size <= 0 or batch_size <= 0:
        return 0
    accumulate = max(1, samples_per_step // batch_size) if samples_per_step else 1
    return math.ceil(math.ceil(size / batch_size) / accumulate)


def steps_for(size: int, batch_size: int, rounds: int, samples_per_step: int = 0) -> int:
    """Optimizer steps per round for a shard of ``size`` samples spread over ``rounds``."""
    if batch_size <= 0 or rounds <= 0:
        return 0
    return math.ceil(optimizer_steps(size, batch_size, samples_per_step) / rounds)


def consumed_after(
    size: int, batch_size: int, rounds: int, done: int, *, samples_per_step: int = 0
) -> int:
    """Samples of a shard of ``size`` a node has trained on after ``done`` of ``rounds`` barriers.

    Mirrors the node's barrier points: barrier k falls after ``ceil(k * steps / rounds)``
    optimizer steps (:func:`optimizer_steps`), each of ``samples_per_step`` samples (default
    ``batch_size``). With ``batch_size`` 0 (unknown), the shard is taken to be consumed evenly
    by samples.
    """
    done = max(0, min(done, rounds))
    if rounds <= 0:
        return size
    if batch_size <= 0:
        return math.ceil(done * size / rounds)
    steps = optimizer_steps(size, batch_size, samples_per_step)
    return min(size, math.ceil(done * steps / rounds) * (samples_per_step or batch_size))


def batch_aligned(size: int, batch_size: int, dataset_size: int) -> int:
    """The most of ``size`` samples a node may take as the tail of its shard: whole batches,
    plus the one partial batch a plain run of its program has (``dataset_size % batch_size``
    samples) if ``size`` leaves room for it. ``batch_size`` 0 (unknown): all of ``size``."""
    if batch_size <= 0:
        return size
    whole = size - size % batch_size
    partial = dataset_size % batch_size
    return whole + (partial if 0 < partial <= size % batch_size else 0)


def cut_in_steps(
    total: int,
    weights: Sequence[float],
    steps: Sequence[int],
    batches: Sequence[int],
) -> list[int]:
    """Shard sizes for ``total`` samples, proportional to ``weights``, in whole optimizer steps.

    ``steps[i]`` is node i's samples per optimizer step and ``batches[i]`` its batch size (0:
    unknown; the node's shard is then cut to the sample). Each node first gets the whole steps
    that fit in its exact quota; the steps left are handed out one at a time to the node
    furthest below its quota (ties: the earlier node) while one fits; the remainder (fewer
    samples than any node's step) goes, :func:`batch_aligned`, to the node that can take most
    of it (ties: furthest below its quota, then the earlier node). The sizes sum to ``total``
    minus what no node's plain run would train (fewer samples than one batch; nothing when
    every node uses the same batch size and step).
    """
    if all(u <= 1 for u in steps):
        return largest_remainder(total, weights)
    fw = [Fraction(w) for w in weights]
    denom = sum(fw)
    if not fw or denom <= 0:
        raise ValueError("weights must be non-empty with a positive sum")
    units = [max(1, u) for u in steps]
    quotas = [total * w / denom for w in fw]
    sizes = [math.floor(q / u) * u for q, u in zip(quotas, units, strict=True)]
    left = total - sum(sizes)
    while True:
        fits = [i for i, u in enumerate(units) if u <= left]
        if not fits:
            break
        i = max(fits, key=lambda j: (quotas[j] - sizes[j], -j))
        sizes[i] += units[i]
        left -= units[i]
    if left > 0:
        takes = [
            batch_aligned(left, b if u > 1 else 0, total)
            for u, b in zip(units, batches, strict=True)
        ]
        i = max(range(len(units)), key=lambda j: (takes[j], quotas[j] - sizes[j], -j))
        sizes[i] += takes[i]
    return sizes


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` that sum to exactly ``total``.

    Each part is the floor of its exact quota, plus one for the parts with the largest
    fractional remainders (ties go to the earlier part), so every part is within one of its
    quota. Quotas are computed with exact rationals: no float rounding decides a tie.
    """
    fw = [Fraction(w) for w in weights]
    denom = sum(fw)
    if not fw or denom <= 0:
        raise ValueError("weights must be non-empty with a positive sum")
    quotas = [total * w / denom for w in fw]
    parts = [math.floor(q) for q in quotas]
    left = total - sum(parts)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - parts[i]), i))
    for i in order[:left]:
        parts[i] += 1
    return parts


class Refusal(msgspec.Struct, frozen=True):
    """Why a node cannot join: ``code`` is the Error code the node is refused with."""

    code: Literal["dataset_mismatch", "refused"]
    reason: str


class NodeScore(msgspec.Struct):
    """What the scheduler knows of one node besides its measured pace (the pace book's)."""

    calibration: float  # GFLOP/s from calibrated_pace
    batch_size: int = 0  # the node's batch size (0: not reported)
    samples_per_step: int = 0  # its samples per optimizer step (0: not reported)


class Scheduler(msgspec.Struct, kw_only=True):
    """Per-session scheduling state: node calibrations and batching, and epoch plans.

    Call :meth:`admit` on a node's ``NodeInfo`` before :meth:`add`; call :meth:`plan_epoch` at
    each epoch start with the live nodes. Estimates use the measured paces the caller passes in
    (``paces``: node → samples/s, the pace book's). Persisted as itself (a ``msgspec.Struct``;
    :meth:`to_dict` / :meth:`from_dict`).
    """

    dataset_size: int
    batch_size: int
    sync_every: int
    seed: int
    min_vram: int = 0
    trust: float = 4.0  # an unmeasured pace stays within this factor of the median
    version: int = _STATE_VERSION
    # every node ever added; "nodes" on disk
    known: dict[str, NodeScore] = msgspec.field(default_factory=dict, name="nodes")

    def __post_init__(self) -> None:
        if self.version != _STATE_VERSION:
            raise ConfigError(
                f"scheduler state version {self.version!r} is not {_STATE_VERSION}: "
                "it was written by another lightning-drift version"
            )
        if self.dataset_size < 0:
            raise ConfigError(f"dataset_size must be >= 0, got {self.dataset_size}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.sync_every <= 0:
            raise ConfigError(f"sync_every must be >= 1, got {self.sync_every}")
        if not self.trust >= 1.0:
            raise ConfigError(f"trust must be >= 1, got {self.trust}")

    def __repr__(self) -> str:
        return (
            f"Scheduler(dataset_size={self.dataset_size}, batch_size={self.batch_size}, "
            f"sync_every={self.sync_every}, seed={self.seed}, nodes={len(self.known)})"
        )

    # -- admission and paces ---------------------------------------------------------------

    def admit(self, info: NodeInfo) -> Refusal | None:
        """Why this node cannot join the session, or None when it can.

        Refused: a dataset size other than the session's, and a CUDA/ROCm train device with
        less total VRAM than ``min_vram`` (a device reporting 0, i.e. unknown, is admitted).
        """
        if info.dataset_size != self.dataset_size:
            return Refusal(
                "dataset_mismatch",
                f"node reports a dataset of {info.dataset_size} samples, the session's has "
                f"{self.dataset_size}: every node must load the same dataset",
            )
        if self.min_vram > 0:
            dev = train_device_info(info)
            if (
                dev is not None
                and dev.kind in ("cuda", "rocm")
                and 0 < dev.vram_total < self.min_vram
            ):
                return Refusal(
                    "refused",
                    f"train device {info.train_device} ({dev.name}) has "
                    f"{format_gib(dev.vram_total)} of VRAM, the session requires at least "
                    f"{format_gib(self.min_vram)}: train on a larger GPU or lower the session's "
                    "min_vram",
                )
        return None

    def add(self, node: str, info: NodeInfo) -> None:
        """Register ``node`` (or refresh a returning one) with its calibrated pace."""
        calib = calibrated_pace(info)
        batch = max(0, info.batch_size)
        per_step = max(0, info.samples_per_step) or batch
        if batch and per_step % batch:
            per_step = batch  # not whole batches: the node's own numbers disagree
        self.known[node] = NodeScore(calib, batch_size=batch, samples_per_step=per_step)
        log.debug("scheduler.add node=%s calibration=%.1f", short_id(node), calib)

    def pace(
        self, node: str, paces: Mapping[str, float] = NO_PACES, factor: float | None = None
    ) -> float:
        """The node's expected samples/s (see the module docstring for the units).

        ``paces``: the measured paces (samples/s) of the nodes that have one. ``factor``:
        samples per GFLOP as returned by :meth:`measured_factor`, when the caller asks for many
        nodes at once (computing it is a pass over every node)."""
        ns = self._get(node)
        measured = paces.get(node, 0.0)
        if measured > 0:
            return measured
        k = self._samples_per_gflop(paces) if factor is None else factor
        est = ns.calibration * k
        ref = lower_median(v for n in self.known if (v := paces.get(n, 0.0)) > 0)
        if ref is None:  # nothing measured: paces are calibrations (k = 1), among themselves
            ref = (lower_median(v.calibration for v in self.known.values()) or 0.0) * k
        return min(ref * self.trust, max(ref / self.trust, est))

    def forget(self, node: str) -> None:
        """Drop ``node`` (a member the session has forgotten)."""
        self.known.pop(node, None)

    def measured_factor(self, paces: Mapping[str, float] = NO_PACES) -> float | None:
        """The conversion ``k`` from calibration GFLOP/s to samples/s, estimated from the
        measured nodes; None while no node is measured (paces are then in calibration units,
        fit only for ratios)."""
        measured = [(paces[n], ns) for n, ns in self.known.items() if paces.get(n, 0.0) > 0]
        if not measured:
            return None
        return sum(p for p, _ in measured) / sum(ns.calibration for _, ns in measured)

    def batching(self, node: str) -> tuple[int, int]:
        """The node's (batch size, samples per optimizer step) as it reported them (0: not)."""
        ns = self._get(node)
        return ns.batch_size, ns.samples_per_step

    def __contains__(self, node: object) -> bool:
        return node in self.known

    @property
    def nodes(self) -> list[str]:
        """Every node ever added, sorted by id."""
        return sorted(self.known)

    def _samples_per_gflop(self, paces: Mapping[str, float]) -> float:
        k = self.measured_factor(paces)
        return 1.0 if k is None else k

    def _get(self, node: str) -> NodeScore:
        try:
            return self.known[node]
        except KeyError:
            raise SessionError(
                f"unknown node {node!r}: the scheduler has no score for it; add() it first",
                code="unknown_node",
            ) from None

    # -- planning ---------------------------------------------------------------------------

    def rounds_for(self, n_nodes: int) -> int:
        """Barriers per epoch when no node reports its step size:
        ``max(1, round(dataset / (batch * sync_every * nodes)))``."""
        return max(
            1, round(self.dataset_size / (self.batch_size * self.sync_every * max(1, n_nodes)))
        )

    def plan_epoch(
        self,
        epoch: int,
        nodes: Sequence[str],
        first_round: int,
        paces: Mapping[str, float] = NO_PACES,
    ) -> EpochPlan:
        """Cut epoch ``epoch`` into one contiguous shard per node, proportional to paces.

        Nodes are ordered by id; shard sizes come from :func:`cut_in_steps` (whole optimizer
        steps of each node; to the sample, by largest-remainder rounding, for nodes that did
        not report their step), so they partition ``range(dataset_size)`` (but for a
        remainder no node's plain run would train) and each is within one step of its
        proportional share. Rounds: ``dataset / (sum of samples per step × sync_every)``
        (the session's batch size for a node that did not say), at most the fewest optimizer
        steps a reporting node's shard gives, at least 1. Deterministic for the same paces.
        """
        order = sorted(set(nodes))
        if not order:
            raise SessionError("cannot plan an epoch with no nodes", code="no_nodes")
        factor = self.measured_factor(paces)
        expected = [self.pace(n, paces, factor) for n in order]
        total = math.fsum(expected)
        batching = [self.batching(n) for n in order]
        sizes = cut_in_steps(
            self.dataset_size, expected, [u for _, u in batching], [b for b, _ in batching]
        )
        per_step = sum(u or self.batch_size for _, u in batching)
        rounds = max(1, round(self.dataset_size / (per_step * self.sync_every)))
        steps = [
            optimizer_steps(size, b, u)
            for size, (b, u) in zip(sizes, batching, strict=True)
            if u > 0 and size > 0
        ]
        if steps:
            rounds = max(1, min(rounds, *steps))
        shards: dict[str, Shard] = {}
        start = 0
        for node, pace, size, (b, u) in zip(order, expected, sizes, batching, strict=True):
            shards[node] = Shard(
                node=node,
                start=start,
                stop=start + size,
                share=pace / total,
                steps_per_round=steps_for(size, b or self.batch_size, rounds, u),
                batch_size=b,
                samples_per_step=u,
            )
            start += size
        log.info(
            "scheduler.plan epoch=%d nodes=%d rounds=%d first_round=%d sizes=%s",
            epoch,
            len(order),
            rounds,
            first_round,
            sizes,
        )
        return EpochPlan(
            epoch=epoch,
            rounds=rounds,
            first_round=first_round,
            shards=shards,
            batch_size=self.batch_size,
            dataset_size=self.dataset_size,
            total_pace=total,
        )

    # -- persistence ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state for the session's state directory."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scheduler:
        """Rebuild a scheduler saved by :meth:`to_dict` (an older one's ``ema`` and measured
        rates are ignored: the pace book keeps measured paces)."""
        return msgspec.convert(d, cls)
