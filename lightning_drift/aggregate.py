"""Aggregation of node weights at a barrier. Pure torch: no I/O, no clock.

- :func:`validate_upload` refuses an upload that does not fit the global model.
- :class:`Accumulator` folds uploads in one at a time (memory O(model), not O(nodes × model))
  into a weighted mean that is bit-for-bit reproducible from the uploads and their order.
- :class:`DiLoCo` turns that mean into an outer Nesterov step on the pseudo-gradient.
- :func:`to_bytes` / :func:`from_bytes` are the safetensors wire and disk format.

Floating tensors are averaged. Integer and bool buffers (``num_batches_tracked``, masks) are
not averageable, and no single contributor may decide them, with two contributors too
(:func:`merge_buffers`): per element, the increment is the "minmod" of the middle pair of
the contributors' sorted increments (0 when the two differ in sign, else the smaller in
magnitude), so a counter moves only as far as the middle contributors agree; a bool buffer
takes the value most contributors hold, a tie keeping the global value.

Carried tensors (``modelspec.carried``: buffers the global weights hold non-finite by design,
such as an additive mask of ``-inf``) are neither averaged nor stepped: every upload must
hold them exactly as the global weights do (a delta: a change of exactly 0), and the
aggregate and the outer step take the global value, bit for bit.

:func:`check_aggregate` is the last check before new global weights are written: finite, and
no tensor moved further than a bound relative to its previous value, and carried
tensors unchanged.

Delta uploads (``delta=True``) carry ``local - global`` for floating tensors, in any floating
dtype (bfloat16 halves the transfer). Integer and bool buffers are always sent as their
local values, never as deltas (a bool cannot be subtracted).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import safetensors.torch
import torch

from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.modelspec import carried, carried_changed, key_difference, names, same_bits

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

_SAME_MODEL = "every node must train the same model"


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def validate_upload(
    global_sd: Mapping[str, torch.Tensor],
    upload: Mapping[str, torch.Tensor],
    *,
    any_float: bool = False,
    fixed: frozenset[str] | None = None,
) -> None:
    """Raise ``SessionError(code="bad_upload")`` naming the first reason ``upload`` is unusable.

    Checked: the same keys as ``global_sd`` (missing or extra keys are named), then per tensor
    in the global model's order: a tensor, the same dtype (with ``any_float``, any floating
    dtype for a floating tensor, as delta and reduced-precision transfers need), the same
    shape, and only finite values in floating tensors, except in the global weights' carried
    tensors (``fixed``; computed from ``global_sd`` when not given), which the upload must
    leave exactly as they are: the same bits, or with ``any_float`` (a delta) a change of 0.
    ``validate_upload(sd, sd)`` checks start-up weights: their non-finite tensors are carried.
    """
    if fixed is None:
        fixed = carried(global_sd)
    why = key_difference(global_sd, upload, "the global model")
    if why:
        raise SessionError(f"upload has {why}; {_SAME_MODEL}", code="bad_upload")
    for name, ref in global_sd.items():
        t = upload[name]
        if not isinstance(t, torch.Tensor):
            raise SessionError(
                f"upload entry {name!r} is a {type(t).__name__}, not a tensor", code="bad_upload"
            )
        dtype_ok = t.dtype == ref.dtype or (any_float and _is_float(ref) and _is_float(t))
        if not dtype_ok:
            raise SessionError(
                f"upload tensor {name!r} has dtype {_dt(t.dtype)}, the global model has "
                f"{_dt(ref.dtype)}; {_SAME_MODEL} (same precision)",
                code="bad_upload",
            )
        if t.shape != ref.shape:
            raise SessionError(
                f"upload tensor {name!r} has shape {tuple(t.shape)}, the global model has "
                f"{tuple(ref.shape)}; {_SAME_MODEL}",
                code="bad_upload",
            )
        if name in fixed:
            kept = bool((t == 0).all()) if any_float else same_bits(t, ref)
            if not kept:
                raise SessionError(f"upload refused: {carried_changed(name)}", code="bad_upload")
        elif _is_float(t):
            bad = int((~torch.isfinite(t)).sum().item())
            if bad:
                raise SessionError(
                    f"upload tensor {name!r} holds {bad} non-finite value(s) (NaN or inf): the "
                    "node's training diverged; lower its learning rate or check its data",
                    code="bad_upload",
                )


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_contribution(contributors: list[tuple[str, float]], node: str, weight: float) -> float:
    """``weight`` as a float, once it is sure that ``node`` has not contributed yet and the
    weight is a finite number >= 0; SessionError otherwise."""
    if any(n == node for n, _ in contributors):
        raise SessionError(
            f"node {node[:16]} already contributed to this round; an upload counts once",
            code="duplicate_upload",
        )
    w = float(weight)
    if not (math.isfinite(w) and w >= 0):
        raise SessionError(
            f"aggregation weight {weight!r} of node {node[:16]} is not a finite number >= 0",
            code="bad_upload",
        )
    return w


def change_norm(
    global_sd: Mapping[str, torch.Tensor],
    upload: Mapping[str, torch.Tensor],
    *,
    delta: bool = False,
    fixed: frozenset[str] = frozenset(),
) -> float:
    """The L2 norm (float64) of ``upload``'s change against ``global_sd`` over every floating
    tensor but the ``fixed`` (carried) ones; with ``delta`` the upload is the change itself.
    The upload is validated first (``SessionError(code="bad_upload")``)."""
    validate_upload(global_sd, upload, any_float=delta, fixed=fixed)
    sq = 0.0
    for k, ref in global_sd.items():
        if not _is_float(ref) or k in fixed:
            continue
        x = upload[k].to(device=ref.device, dtype=torch.float64)
        d = x if delta else x - ref.to(torch.float64)
        sq += float(torch.linalg.vector_norm(d)) ** 2
    return math.sqrt(sq)


class Checked:
    """The upload an accumulator's ``change`` validated and measured last, so that the
    ``add`` of that same upload does neither again (one pass over it less per upload)."""

    def __init__(self) -> None:
        self._last: tuple[Mapping[str, torch.Tensor], bool, float] | None = None

    def keep(self, upload: Mapping[str, torch.Tensor], delta: bool, norm: float) -> float:
        self._last = (upload, delta, norm)
        return norm

    def take(self, upload: Mapping[str, torch.Tensor], delta: bool) -> float | None:
        """The norm measured of ``upload`` (this very object, taken as ``delta``), or None
        when it was not the one checked last: then it must be validated and measured."""
        last, self._last = self._last, None
        if last is not None and last[0] is upload and last[1] == delta:
            return last[2]
        return None


class Accumulator:
    """The weighted mean of one round's uploads, built as they arrive.

    Floating tensors: ``sum_i w_i * x_i`` is accumulated in float64 in arrival order
    (``acc = acc + (x_i.double() * w_i)``), and :meth:`mean` returns ``acc / sum_i w_i`` cast
    to the global tensor's dtype. Integer and bool buffers: :func:`merge_buffers` over the
    contributors with a weight above 0. Memory is one float64 copy of the floating tensors
    plus one copy of the integer buffers per contributor, however many nodes contribute; the
    floating part of an upload is not kept. Carried tensors take the global value.

    ``norms`` records each upload's change against the global weights (the L2 norm over every
    floating tensor, float64): what names a suspect when the round's aggregate fails.
    """

    def __init__(self, global_sd: Mapping[str, torch.Tensor]) -> None:
        self._global: StateDict = dict(global_sd)
        self._fixed = carried(self._global)  # carried as they are: never averaged
        self._acc: StateDict = {}
        for k, t in self._global.items():
            if _is_float(t) and k not in self._fixed:
                self._acc[k] = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        self._ints: list[StateDict] = []  # integer/bool buffers of contributors with weight > 0
        self.contributors: list[tuple[str, float]] = []
        self.norms: dict[str, float] = {}
        self.total_weight = 0.0
        self._checked = Checked()

    def add(
        self,
        node: str,
        upload: Mapping[str, torch.Tensor],
        weight: float,
        *,
        delta: bool = False,
    ) -> None:
        """Fold in ``node``'s upload with ``weight`` (its samples since the last barrier).

        The upload is validated completely before anything changes: a bad one raises
        ``SessionError(code="bad_upload")`` and leaves the accumulator as it was. With
        ``delta``, floating tensors are ``local - global`` in any floating dtype and the
        contribution is ``global + delta`` (in float64).
        """
        w = check_contribution(self.contributors, node, weight)
        norm = self._checked.take(upload, delta)
        if norm is None:
            validate_upload(self._global, upload, any_float=delta, fixed=self._fixed)
        sq = 0.0
        for k, acc in self._acc.items():
            # Fresh float64 copies: never write into the caller's upload or the global weights.
            g = self._global[k].to(device=acc.device, dtype=torch.float64)
            if delta:
                d = upload[k].to(device=acc.device, dtype=torch.float64)
                x = g + d
            else:
                x = upload[k].to(device=acc.device, dtype=torch.float64, copy=True)
                d = x - g
            if norm is None:
                sq += float(torch.linalg.vector_norm(d)) ** 2
            acc.add_(x.mul_(w))
        if w > 0:
            self._ints.append(
                {k: upload[k].to(ref.device).clone() for k, ref in self._global.items()
                 if not _is_float(ref)}
            )  # fmt: skip
        self.norms[node] = math.sqrt(sq) if norm is None else norm
        self.contributors.append((node, w))
        self.total_weight += w
        log.debug("aggregate.add node=%s weight=%s n=%d", node[:12], w, len(self.contributors))

    def change(self, upload: Mapping[str, torch.Tensor], *, delta: bool = False) -> float:
        """The L2 norm of ``upload``'s change against the global weights, as :meth:`add`
        would record it, without adding it (validated first: a bad upload raises); adding
        this same upload next neither validates nor measures it again."""
        norm = change_norm(self._global, upload, delta=delta, fixed=self._fixed)
        return self._checked.keep(upload, delta, norm)

    def __len__(self) -> int:
        return len(self.contributors)

    def mean(self) -> StateDict:
        """The aggregate, in the global model's key order and dtypes.

        Raises ``SessionError`` when nothing was added or every weight is 0.
        """
        if not self.contributors:
            raise SessionError("no uploads to aggregate in this round", code="empty_round")
        if self.total_weight <= 0:
            raise SessionError(
                "every upload of this round has weight 0 (no samples trained); nothing to average",
                code="empty_round",
            )
        out: StateDict = {}
        for k, ref in self._global.items():
            if k in self._acc:
                out[k] = (self._acc[k] / self.total_weight).to(ref.dtype)
            elif k in self._fixed:
                out[k] = ref.clone()
            else:
                out[k] = merge_buffers(ref, [ints[k] for ints in self._ints])
        return out

    def nbytes(self) -> int:
        """Bytes of tensors the accumulator owns (excludes the global weights it refers to)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        """The tensors the accumulator owns: float64 sums and contributors' integer buffers."""
        return [*self._acc.values(), *(t for ints in self._ints for t in ints.values())]


def merge_buffers(ref: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """The new value of an integer or bool buffer whose global value is ``ref``, from the
    contributors' ``values`` (each in ``ref``'s dtype and shape); no single contributor
    decides it, with two contributors too.

    The rule, per element: sort the contributors' increments ``value - ref`` and take the
    middle pair (the two middle ones of an even count; of an odd count the median, twice).
    When the pair's increments differ in sign, or one is 0, the increment is 0; otherwise it
    is the one of smaller magnitude (the "minmod" of the middle pair). An increment no middle
    contributor's evidence supports is not taken: a counter (``num_batches_tracked``) only
    moves as far as the middle contributors agree it moved.

    What one hostile contributor can do: with two, the result lies between ``ref`` and the
    honest value, so it can hold a counter back but never push it backwards or past what the
    honest node counted; with three or more, every middle value is bounded by honest ones, so
    the result stays within the honest contributors' range (or at ``ref``). No values: ``ref``.

    Computed without subtracting: increments are ordered as the values are, so the minmod of
    the middle pair ``(lo, hi)`` of the sorted values is ``ref`` clamped to ``[lo, hi]``
    (both positive: ``lo``; both negative: ``hi``; otherwise ``ref``). The result is always
    ``ref`` or a contributor's value, so it cannot overflow the dtype however extreme the
    values are. A bool buffer follows the same rule, which is a majority vote whose tie
    keeps ``ref``.
    """
    if not values:
        return ref.clone()
    for v in values:
        if v.dtype != ref.dtype or v.shape != ref.shape:
            raise SessionError(
                f"buffer value has dtype {_dt(v.dtype)} and shape {tuple(v.shape)}, the global "
                f"buffer {_dt(ref.dtype)} and {tuple(ref.shape)}; {_SAME_MODEL}",
                code="bad_upload",
            )
    n = len(values)
    ordered = torch.stack([v.to(ref.device) for v in values]).sort(dim=0).values
    lo, hi = ordered[(n - 1) // 2], ordered[n // 2]
    return torch.maximum(lo, torch.minimum(ref, hi))


def check_aggregate(
    old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], max_change: float
) -> str | None:
    """Why ``new`` must not become the global weights after ``old``, or None.

    Refused: a carried tensor of ``old`` (non-finite by design) that is not exactly as it was,
    a non-finite value in any other floating tensor, or a floating tensor that moved further
    than ``max_change × (‖old‖ + √numel)`` (L2, float64): a model that legitimate training
    changes by a fraction of its size per round cannot move by many times its size (the
    ``√numel`` term allows tensors that start at 0). ``max_change`` 0: no bound."""
    fixed = carried(old)
    for k, t in new.items():
        if k in fixed:
            if not same_bits(t, old[k]):
                return f"tensor {k[:80]!r}, non-finite by design, changed"
            continue
        if not _is_float(t):
            continue
        bad = int((~torch.isfinite(t)).sum().item())
        if bad:
            return f"tensor {k[:80]!r} holds {bad} non-finite value(s)"
        if max_change <= 0 or k not in old:
            continue
        ref = old[k].to(torch.float64)
        moved = float(torch.linalg.vector_norm(t.to(torch.float64) - ref))
        why = moved_too_far(k, moved, float(torch.linalg.vector_norm(ref)), ref.numel(), max_change)
        if why is not None:
            return why
    return None


def moved_too_far(
    name: str, moved: float, norm: float, numel: int, max_change: float
) -> str | None:
    """Why tensor ``name`` (L2 norm ``norm`` before, ``numel`` values) may not move by
    ``moved`` (L2) in one round, or None: the bound of :func:`check_aggregate`, whether the
    norms come whole or summed from shards."""
    bound = max_change * (norm + math.sqrt(numel))
    if moved <= bound:
        return None
    return (
        f"tensor {name[:80]!r} moved by {moved:.3g} (L2), over the bound {bound:.3g} "
        f"(max_change {max_change:g} × (its norm + √size))"
    )


# The outer learning rate by the round's number of contributors (uploads of weight > 0), at the
# default momentum; between two counts the lr follows log2(count) linearly, beyond the last it
# stays. benchmarks/outer_sweep.py (docs/benchmarks.md, "outer_sweep.py") measured 0.7 best
# at 2 nodes (of 0.5, 0.7, 1) and at 4 (of 0.7, 1); at 8, 1 beat 0.7 by 0.8 % with float32
# changes and by 1.0 % with int2 over whole 8-epoch sessions (and 1.4 lost to 1).
OUTER_LR: tuple[tuple[int, float], ...] = ((1, 0.7), (2, 0.7), (4, 0.7), (8, 1.0))
OUTER_MOMENTUM = 0.6


def outer_settings(
    contributors: int,
    round_no: int,
    lr: float = 0.0,
    momentum: float = OUTER_MOMENTUM,
    warmup: int = 0,
) -> tuple[float, float]:
    """DiLoCo's (outer lr, momentum) for round ``round_no`` (1, 2, ...) of ``contributors``
    uploads of weight > 0: ``lr`` when above 0 (the operator's), else :data:`OUTER_LR`'s for
    that many contributors; ramped up linearly over the first ``warmup`` rounds. Every side
    of a round (the star's coordinator, every shard's seat, an audit) computes it from the same
    integers, so they step with the same float."""
    if lr <= 0:
        n = max(1, contributors)
        lr = OUTER_LR[-1][1]
        for (n0, lr0), (n1, lr1) in zip(OUTER_LR, OUTER_LR[1:], strict=False):
            if n0 <= n <= n1:
                t = (math.log2(n) - math.log2(n0)) / (math.log2(n1) - math.log2(n0))
                lr = lr0 + (lr1 - lr0) * t
                break
    if warmup > 0:
        lr *= min(1.0, max(1, round_no) / warmup)
    return lr, momentum


def weighed(contributors: list[tuple[str, float]]) -> int:
    """How many of a round's contributors count in its mean (weight above 0)."""
    return sum(1 for _, w in contributors if w > 0)


class DiLoCo:
    """The DiLoCo outer optimizer: SGD with (Nesterov) momentum on the pseudo-gradient.

    At each barrier, ``g = global - mean`` is the pseudo-gradient and the new global weights
    follow ``torch.optim.SGD(lr=lr, momentum=momentum, nesterov=nesterov, dampening=0)``'s
    formula for ``param = global, param.grad = g``: ``b = momentum * b + g`` (``b = g`` on
    the first step), ``u = g + momentum * b`` (Nesterov) or ``u = b``, ``new = global - lr *
    u``. It is computed so that every machine, and every shard of a tensor, gets the same
    bits: each multiply and each add is its own operation in float64, and the result is cast
    back to the parameter's dtype once, at the end. SGD's own kernel does ``add_(x,
    alpha=...)``, which torch's avx2 and avx512 CPU kernels compute as a fused multiply-add
    and its default ones do not, so its bits depend on the CPU (measured with torch 2.13);
    an elementwise float64 operation between tensors, or with a Python float, is correctly
    rounded by every kernel, and one value's result never depends on its neighbours. The
    result therefore differs from SGD's by float rounding only.
    Momentum buffers are kept (and saved) in float32, float64 for float64 parameters, and
    the step reads the buffer as kept, so a restart from a checkpoint steps as an unbroken
    session would. Integer and bool buffers take the mean's value; carried tensors
    (non-finite by design) the global value, unstepped.

    How far it moves: while the pseudo-gradient keeps its direction, round t's step is
    ``lr * (1 + m * (1 - m**t) / (1 - m))`` times the mean's own change (``m`` the momentum):
    ``lr * (1 + m)`` at first, ``lr / (1 - m)`` once the momentum has built up, which takes
    about ``1 / (1 - m)`` rounds. With the defaults (0.7, 0.6) that is 1.12x, then 1.75x
    within 3 rounds. DiLoCo's published 0.9 needs some 20 rounds to settle at 7x: in a session
    of tens of rounds it keeps growing until the end (5.8x by round 16) and overshoots (see
    docs/benchmarks.md, ``outer_sweep.py``). The pseudo-gradient is the mean over the round's
    contributors only: a straggler left out of a round adds nothing to it. ``lr = 1,
    momentum = 0`` (with ``nesterov=False``) is the plain mean.
    """

    def __init__(
        self, lr: float = 0.7, momentum: float = OUTER_MOMENTUM, nesterov: bool = True
    ) -> None:
        if nesterov and momentum <= 0:
            raise ConfigError(
                f"Nesterov momentum needs outer momentum > 0, got {momentum}: set a momentum "
                "or turn nesterov off"
            )
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self._buf: StateDict = {}

    def step(
        self, global_sd: Mapping[str, torch.Tensor], mean_sd: Mapping[str, torch.Tensor]
    ) -> StateDict:
        """The new global weights from the current ones and the round's mean."""
        if set(global_sd) != set(mean_sd):
            diff = sorted(set(global_sd) ^ set(mean_sd))
            raise SessionError(
                f"mean and global weights have different tensors: {names(diff)}",
                code="bad_upload",
            )
        out: StateDict = {}
        fixed = carried(global_sd)
        for k, p in global_sd.items():
            m = mean_sd[k]
            if k in fixed:
                out[k] = p.clone()  # global - lr * (global - mean) would be NaN at an inf
                continue
            if not _is_float(p):
                out[k] = m.clone()
                continue
            param = p.detach().to(torch.float64)
            grad = param - m.detach().to(device=param.device, dtype=torch.float64)
            if self.momentum != 0:
                kept = self._buf.get(k)
                b = grad if kept is None else kept.to(torch.float64) * self.momentum + grad
                bdt = torch.float64 if p.dtype == torch.float64 else torch.float32
                kept = b.to(bdt)
                self._buf[k] = kept
                b = kept.to(torch.float64)
                grad = grad + b * self.momentum if self.nesterov else b
            out[k] = (param - grad * self.lr).to(p.dtype)
        return out

    def state_dict(self) -> StateDict:
        """Momentum buffers by parameter name (save them with the checkpoint)."""
        return {k: v.clone() for k, v in self._buf.items()}

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Restore momentum buffers saved by :meth:`state_dict`."""
        self._buf = {k: v.detach().clone() for k, v in sd.items()}


def to_bytes(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> bytes:
    """Serialize a state dict as safetensors; ``dtype`` casts floating tensors only.

    Tensors may share storage or be non-contiguous views (tied weights): each is written as
    its own contiguous copy where needed. The output is deterministic for equal inputs.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(
            f"transfer dtype {_dt(dtype)} is not a floating dtype: use float32 or bfloat16"
        )
    seen: set[int] = set()
    flat: StateDict = {}
    for k, t in sd.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if dtype is not None and _is_float(t) and t.dtype != dtype:
            t = t.to(dtype)
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if not t.is_contiguous() or (ptr and ptr in seen):
            t = t.contiguous().clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr:
            seen.add(ptr)
        flat[k] = t
    return safetensors.torch.save(flat)


def from_bytes(b: bytes | bytearray | memoryview) -> StateDict:
    """Parse safetensors bytes; ``SessionError(code="bad_upload")`` if they are not valid."""
    try:
        return safetensors.torch.load(bytes(b))
    except Exception as exc:  # the binding raises its own SafetensorError or others
        raise SessionError(
            f"not a valid safetensors state dict ({len(b)} bytes): {exc}", code="bad_upload"
        ) from None
