"""Robust aggregation: each method's bound holds with one hostile node among three or more."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_drift.aggregate import Accumulator, check_aggregate
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.robust import RobustAccumulator, lower_median, suspects, trim_count


def glob() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(6, 4, generator=g),
        "b": torch.randn(4, generator=g),
        "steps": torch.tensor(100, dtype=torch.int64),
    }


def honest(ref: dict, seed: int, scale: float = 0.01) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    out = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in ref.items() if k != "steps"}
    out["steps"] = ref["steps"] + 10
    return out


def hostile(ref: dict, value: float) -> dict:
    """Finite but absurd: every weight ``value`` (±3.4e38 is float32's edge)."""
    out = {k: torch.full_like(v, value) for k, v in ref.items() if k != "steps"}
    out["steps"] = torch.tensor(2**62)
    return out


def test_lower_median():
    assert lower_median([3.0, 1.0, 2.0, 10.0]) == 2.0 and lower_median([5.0]) == 5.0
    assert lower_median([]) is None


def test_trim_count():
    assert [trim_count(n, 0.2) for n in (1, 2, 3, 4, 5, 9, 10, 20)] == [0, 0, 1, 1, 1, 1, 2, 4]
    assert trim_count(3, 0.0) == 1  # at least one from each end from three on
    assert trim_count(5, 0.49) == 2  # never more than (n - 1) // 2


@settings(max_examples=30, deadline=None)
@given(
    n_honest=st.integers(2, 6),
    method=st.sampled_from(["trimmed", "median"]),
    factor=st.sampled_from([1e30, -1e30, 3.4e38, 1e6]),
    seed=st.integers(0, 1000),
)
def test_one_hostile_node_stays_within_the_honest_range(n_honest, method, factor, seed):
    ref = glob()
    acc = RobustAccumulator(ref, method=method, trim=0.2)
    ups = [honest(ref, seed + i) for i in range(n_honest)]
    for i, up in enumerate(ups):
        acc.add(f"h{i}", up, 10.0)
    acc.add("evil", hostile(ref, factor), 1e9)  # its weight does not matter either
    out = acc.mean()
    for k in ("w", "b"):
        stack = torch.stack([u[k] for u in ups])
        lo, hi = stack.min(0).values, stack.max(0).values
        assert bool(((out[k] >= lo - 1e-6) & (out[k] <= hi + 1e-6)).all()), (method, k)
    assert out["steps"].item() == 110  # the median increment, not 2^62
    assert check_aggregate(ref, out, 10.0) is None


def test_the_clip_bounds_a_hostile_change_to_a_multiple_of_the_median():
    ref = glob()
    acc = RobustAccumulator(ref, method="off", clip=2.0)
    ups = [honest(ref, i) for i in range(3)]
    for i, up in enumerate(ups):
        acc.add(f"h{i}", up, 1.0)
    acc.add("evil", hostile(ref, 1e30), 1.0)
    norms = acc.norms
    med = sorted(norms.values())[(len(norms) - 1) // 2]
    scales = acc.scales()
    assert scales[:3] == [1.0, 1.0, 1.0] and scales[3] * norms["evil"] == pytest.approx(2 * med)
    out = acc.mean()
    moved = math.sqrt(sum(float(((out[k] - ref[k]).double() ** 2).sum()) for k in ("w", "b")))
    # The mean of four changes, each at most 2 x the median change.
    assert moved <= 2 * med + 1e-9
    assert check_aggregate(ref, out, 10.0) is None
    assert suspects(norms, 10.0) == ["evil"]


def test_without_robustness_the_check_catches_the_poisoned_mean():
    ref = glob()
    acc = Accumulator(ref)
    for i in range(2):
        acc.add(f"h{i}", honest(ref, i), 1.0)
    acc.add("evil", hostile(ref, 1e30), 1.0)
    out = acc.mean()
    why = check_aggregate(ref, out, 10.0)
    assert why is not None and "moved by" in why and "'w'" in why
    assert suspects(acc.norms, 10.0) == ["evil"]
    assert out["steps"].item() == 110  # integer buffers are safe even in the plain mean
    inf = {k: (v.clone() if k == "steps" else torch.full_like(v, float("inf"))) for k, v in ref.items()}
    assert "non-finite" in check_aggregate(ref, inf, 0.0)


def test_off_without_clip_is_the_weighted_mean_of_the_changes():
    ref = glob()
    robust = RobustAccumulator(ref, method="off")
    exact = Accumulator(ref)
    for i, w in enumerate((1.0, 3.0, 0.0)):
        up = honest(ref, i)
        robust.add(f"n{i}", up, w)
        exact.add(f"n{i}", up, w)
    a, b = robust.mean(), exact.mean()
    for k in ("w", "b"):
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert torch.equal(a["steps"], b["steps"])
    assert robust.contributors == exact.contributors


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    ref = {"x": torch.zeros(1)}
    acc = RobustAccumulator(ref, method="median")
    for i, v in enumerate((1.0, 2.0, 4.0, 100.0)):
        acc.add(f"n{i}", {"x": torch.tensor([v])}, 1.0)
    assert acc.mean()["x"].item() == 3.0


def test_robust_refusals():
    ref = glob()
    with pytest.raises(ConfigError, match="robust aggregation must be"):
        RobustAccumulator(ref, method="mode")
    acc = RobustAccumulator(ref, method="median")
    with pytest.raises(SessionError, match="no uploads"):
        acc.mean()
    up = honest(ref, 0)
    acc.add("a", up, 1.0)
    with pytest.raises(SessionError, match="already contributed"):
        acc.add("a", up, 1.0)
    bad = dict(up, w=torch.full((6, 4), float("nan")))
    with pytest.raises(SessionError, match="non-finite"):
        acc.add("b", bad, 1.0)
    assert len(acc) == 1
