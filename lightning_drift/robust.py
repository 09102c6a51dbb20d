"""Robust aggregation of one round: what holds when a contributor is hostile. Pure torch.

The exact weighted mean (:class:`lightning_drift.aggregate.Accumulator`) lets one node move
the global weights as far as it likes. :class:`RobustAccumulator` keeps the round's
contributions, each seen as its **change** against the current global weights (float64,
``upload - global``, or the delta itself for a delta upload), and combines them at the end:

- **clip** (``clip > 0``): a contribution whose change has an L2 norm (over every floating
  tensor) above ``clip ×`` the round's lower-median norm is scaled down to that norm. With
  fewer than half the contributors hostile, the median norm is an honest one, so no
  contribution moves the weights further than ``clip ×`` an honest node's change.
- **method** ``"off"``: the samples-weighted mean of the (clipped) changes.
- **method** ``"trimmed"``: coordinate-wise trimmed mean, unweighted: in every coordinate the
  ``k`` largest and ``k`` smallest changes are dropped and the rest averaged, ``k =
  max(1, floor(trim × n))`` for n ≥ 3 contributors (at most ``(n - 1) // 2``). With at most
  ``k`` hostile contributors every coordinate lies within the honest contributors' range.
- **method** ``"median"``: coordinate-wise median, unweighted (the mean of the two middle
  values for an even count). With fewer than half hostile, every coordinate lies within the
  honest range.

Contributions with weight 0 (nothing trained this round) take no part. With fewer than three
contributors no method can out-vote a hostile one: "trimmed" and "median" then average, and
only the clip bounds it. Integer and bool buffers follow
:func:`lightning_drift.aggregate.merge_buffers` as in the mean; carried tensors (non-finite by
design, ``modelspec.carried``) take the global value and count in no norm, as in the mean.

Memory: every contribution of the round is kept as uploaded (its wire dtype) until the round
completes, plus, while combining, one float64 stack of a single tensor over the
contributors: about ``live nodes × upload size + live nodes × 8 × largest tensor``. The
coordinator caps live nodes (``--max-nodes``), which bounds it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from lightning_drift.aggregate import (
    Checked,
    StateDict,
    change_norm,
    check_contribution,
    merge_buffers,
)
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.modelspec import carried

METHODS = ("off", "trimmed", "median")  # the choices of the session's ``robust`` setting


@dataclass(frozen=True)
class Contribution:
    """One node's upload for the round, as uploaded (no copy), with its aggregation weight."""

    node: str
    weight: float
    upload: Mapping[str, torch.Tensor]
    delta: bool  # the floating tensors are already ``local - global``

    def change(self, key: str, ref: torch.Tensor) -> torch.Tensor:
        """This contribution's change of tensor ``key`` against the global ``ref``, float64."""
        x = self.upload[key].to(device=ref.device, dtype=torch.float64)
        return x if self.delta else x - ref.to(torch.float64)


def trim_count(n: int, trim: float) -> int:
    """How many values are dropped at each end of a coordinate for ``n`` contributors."""
    if n < 3:
        return 0
    return min((n - 1) // 2, max(1, math.floor(trim * n)))


def lower_median(values: Iterable[float]) -> float | None:
    """The lower median (of an even count, the smaller middle value); None for no values.
    The lower one, so that with two contributors the honest-sized one is the median."""
    vs = sorted(values)
    return vs[(len(vs) - 1) // 2] if vs else None


def suspects(norms: Mapping[str, float], factor: float) -> list[str]:
    """The contributors whose change is out of line: a norm above ``factor ×`` the round's
    lower median (or not finite). Empty when nobody stands out (one contributor, or all
    alike): then no single node can be blamed."""
    med = lower_median(norms.values())
    if len(norms) < 2 or med is None:
        return []
    return [n for n, v in norms.items() if not math.isfinite(v) or v > factor * max(med, 1e-12)]


def _row_sum(rows: torch.Tensor) -> torch.Tensor:
    """The sum of ``rows`` (contributors × values, float64), added one row after another.

    Not ``rows.sum(0)``: torch picks how a reduction associates its additions by the shape
    and the threads at hand, so a column's sum can differ in its last bit between the whole
    tensor and a slice of it (measured with torch 2.13: one column of 40001, 33 rows). Added
    in contributor order, every column gets the same bits however the tensor is cut."""
    out = rows[0].clone()
    for row in rows[1:]:
        out.add_(row)
    return out


class RobustAccumulator:
    """Collects a round's contributions and combines them robustly (see the module doc).

    The same calls as ``Accumulator``: :meth:`add` (validates first; a bad upload changes
    nothing), ``contributors``, ``total_weight``, ``norms`` and :meth:`mean`, which returns
    the global weights plus the combined change, in the global model's dtypes."""

    def __init__(
        self,
        global_sd: Mapping[str, torch.Tensor],
        *,
        method: str = "off",
        trim: float = 0.2,
        clip: float = 0.0,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"robust aggregation must be {', '.join(METHODS)}; got {method!r}")
        self._global: StateDict = dict(global_sd)
        self._fixed = carried(self._global)  # carried as they are: never combined
        self.method = method
        self.trim = trim
        self.clip = clip
        self._kept: list[Contribution] = []
        self.contributors: list[tuple[str, float]] = []
        self.norms: dict[str, float] = {}
        self.total_weight = 0.0
        self._checked = Checked()

    def __len__(self) -> int:
        return len(self.contributors)

    def change(self, upload: Mapping[str, torch.Tensor], *, delta: bool = False) -> float:
        """The L2 norm of ``upload``'s change, as :meth:`add` would record it (not added; adding
        this same upload next neither validates nor measures it again)."""
        norm = change_norm(self._global, upload, delta=delta, fixed=self._fixed)
        return self._checked.keep(upload, delta, norm)

    def add(
        self,
        node: str,
        upload: Mapping[str, torch.Tensor],
        weight: float,
        *,
        delta: bool = False,
    ) -> None:
        w = check_contribution(self.contributors, node, weight)
        c = Contribution(node, w, upload, delta)
        norm = self._checked.take(upload, delta)
        if norm is None:
            norm = change_norm(self._global, upload, delta=delta, fixed=self._fixed)
        self.norms[node] = norm
        if w > 0:
            self._kept.append(c)
        self.contributors.append((node, w))
        self.total_weight += w

    def scales(self) -> list[float]:
        """The clip factor of each kept contribution (1.0: not clipped)."""
        if self.clip <= 0 or not self._kept:
            return [1.0] * len(self._kept)
        med = lower_median(self.norms[c.node] for c in self._kept)
        assert med is not None
        cap = self.clip * med
        return [1.0 if self.norms[c.node] <= cap else cap / self.norms[c.node] for c in self._kept]

    def mean(self) -> StateDict:
        """The global weights plus the round's combined change (see the module docstring)."""
        if not self.contributors:
            raise SessionError("no uploads to aggregate in this round", code="empty_round")
        if self.total_weight <= 0 or not self._kept:
            raise SessionError(
                "every upload of this round has weight 0 (no samples trained); nothing to average",
                code="empty_round",
            )
        kept = self._kept
        scales = torch.tensor(self.scales(), dtype=torch.float64)
        weights = torch.tensor([c.weight for c in kept], dtype=torch.float64)
        total = sum(c.weight for c in kept)  # in order, in Python: not a vectorized sum
        n = len(kept)
        out: StateDict = {}
        for k, ref in self._global.items():
            if k in self._fixed:
                out[k] = ref.clone()
                continue
            if not ref.is_floating_point():
                out[k] = merge_buffers(ref, [c.upload[k] for c in kept])
                continue
            stack = torch.stack([c.change(k, ref) for c in kept])  # n × shape, float64
            view = stack.reshape(n, -1) * scales.to(stack.device).unsqueeze(1)
            if self.method == "off":
                w = weights.to(stack.device).unsqueeze(1)
                agg = _row_sum(view * w) / total
            else:
                view = view.sort(dim=0, stable=True).values
                if self.method == "trimmed":
                    t = trim_count(n, self.trim)
                    agg = _row_sum(view[t : n - t]) / (n - 2 * t)
                else:  # median: the middle one, or the mean of the two middle ones
                    lo, hi = (n - 1) // 2, n // 2 + 1
                    agg = _row_sum(view[lo:hi]) / (hi - lo)
            out[k] = (ref.to(torch.float64) + agg.reshape(ref.shape)).to(ref.dtype)
        return out


__all__ = [
    "METHODS",
    "Contribution",
    "RobustAccumulator",
    "lower_median",
    "suspects",
    "trim_count",
]
