"""Integer and bool buffers: the rule no single contributor decides (merge_buffers).

Per element: the minmod of the middle pair of the contributors' sorted increments. These
tests state what a hostile contributor can and cannot do with it, for two contributors and
more, at the edges of each integer dtype, and check the vectorised rule against the rule
written out with Python integers.
"""

from __future__ import annotations

import random

import pytest
import torch

from lightning_drift.aggregate import Accumulator, merge_buffers
from lightning_drift.errors import SessionError

I64_MAX, I64_MIN = 2**63 - 1, -(2**63)


def merged(ref: int, *values: int, dtype: torch.dtype = torch.int64) -> int:
    out = merge_buffers(
        torch.tensor(ref, dtype=dtype), [torch.tensor(v, dtype=dtype) for v in values]
    )
    assert out.dtype == dtype and out.shape == ()
    return int(out)


def by_hand(ref: int, values: list[int]) -> int:
    """The rule as stated, with Python integers (no overflow): ref + minmod(middle pair)."""
    inc = sorted(v - ref for v in values)
    a, b = inc[(len(inc) - 1) // 2], inc[len(inc) // 2]
    step = 0 if a * b <= 0 else (a if abs(a) < abs(b) else b)
    return ref + step


# -- two contributors: one honest (+10), one hostile ---------------------------------------------


@pytest.mark.parametrize(
    ("hostile", "expect"),
    [
        (-(2**62), 100),  # pushed backwards, far: held at the global value
        (2**62, 110),  # pushed forwards, far: the honest increment
        (97, 100),  # a small step back: held
        (102, 102),  # a smaller step forwards: held back to it, never past the honest one
        (100, 100),  # no step at all
        (110, 110),  # the same as the honest node
        (I64_MIN, 100),
        (I64_MAX, 110),
    ],
)
def test_with_two_contributors_a_hostile_one_can_only_hold_a_counter_back(hostile, expect):
    # Prepare: the global counter is 100; the honest node trained 10 batches.
    ref, honest = 100, 110

    # Execute: either arrival order
    first, second = merged(ref, honest, hostile), merged(ref, hostile, honest)

    # Assert: between the global value and the honest one, whatever the hostile value
    assert first == second == expect
    assert ref <= first <= honest


def test_two_honest_contributors_advance_by_the_smaller_increment():
    assert merged(0, 10, 30) == 10
    assert merged(50, 40, 45) == 45  # both went back (a reset): the smaller step back


# -- three and four contributors -----------------------------------------------------------------


@pytest.mark.parametrize("hostile", [-(2**62), -5, 0, 3, 12, 2**62, I64_MIN, I64_MAX])
def test_with_three_contributors_one_hostile_stays_within_the_honest_range(hostile):
    # Prepare: honest increments +10 and +20 on a counter at 0
    got = merged(0, 10, hostile, 20)

    # Assert: an honest node's value, or one between them
    assert 10 <= got <= 20
    assert got == by_hand(0, [10, hostile, 20])


@pytest.mark.parametrize("hostile", [-(2**62), -5, 15, 2**62])
def test_with_four_contributors_one_hostile_stays_within_the_honest_range(hostile):
    got = merged(0, 10, 20, 30, hostile)

    assert 10 <= got <= 30
    assert got == by_hand(0, [10, 20, 30, hostile])


def test_with_four_contributors_a_split_middle_pair_holds_the_value():
    # Two went back, two went forward: no middle contributor supports a direction.
    assert merged(100, 90, 95, 105, 110) == 100


def test_one_contributor_takes_its_own_value():
    assert merged(100, 110) == 110
    assert merged(100, 7) == 7


# -- the dtypes' edges ----------------------------------------------------------------------------


def test_int64_extremes_never_overflow():
    assert merged(I64_MAX - 5, I64_MAX, I64_MAX) == I64_MAX
    assert merged(I64_MIN + 5, I64_MIN, I64_MIN) == I64_MIN
    assert merged(I64_MAX, I64_MIN, I64_MIN) == I64_MIN  # every contributor says so
    assert merged(I64_MIN, I64_MAX, I64_MAX - 1) == I64_MAX - 1
    assert merged(I64_MAX, I64_MIN, I64_MAX) == I64_MAX


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [
        (torch.int32, -(2**31), 2**31 - 1),
        (torch.int16, -(2**15), 2**15 - 1),
        (torch.int8, -128, 127),
        (torch.uint8, 0, 255),
    ],
)
def test_small_dtypes_keep_their_dtype_and_stay_in_range(dtype, low, high):
    mid = (low + high) // 2
    assert merged(mid, mid + 3, high, dtype=dtype) == mid + 3
    assert merged(mid, mid + 3, low, dtype=dtype) == mid
    assert merged(high - 1, high, high, dtype=dtype) == high
    assert merged(low + 1, low, low, low, dtype=dtype) == low
    assert merged(mid, low, high, mid + 1, dtype=dtype) == mid + 1


def test_the_rule_applies_per_element_and_matches_the_rule_by_hand():
    # Prepare: random counters and contributions, 1 to 6 contributors, many elements
    rng = random.Random(7)
    for n in range(1, 7):
        ref = [rng.randrange(-50, 50) for _ in range(200)]
        values = [[r + rng.randrange(-20, 40) for r in ref] for _ in range(n)]

        # Execute
        out = merge_buffers(torch.tensor(ref), [torch.tensor(v) for v in values])

        # Assert
        expect = [by_hand(r, [v[i] for v in values]) for i, r in enumerate(ref)]
        assert out.tolist() == expect, n


def test_inputs_are_not_modified_and_the_result_is_new():
    ref, a, b = torch.tensor([5, 5]), torch.tensor([9, 1]), torch.tensor([7, 8])
    out = merge_buffers(ref, [a, b])
    assert out.tolist() == [7, 5]
    out += 1
    assert ref.tolist() == [5, 5] and a.tolist() == [9, 1] and b.tolist() == [7, 8]


def test_a_value_of_another_dtype_or_shape_is_refused():
    with pytest.raises(SessionError, match="dtype int32"):
        merge_buffers(torch.tensor(1), [torch.tensor(2, dtype=torch.int32)])
    with pytest.raises(SessionError, match=r"shape \(2,\)"):
        merge_buffers(torch.tensor(1), [torch.tensor([2, 3])])


# -- bools ----------------------------------------------------------------------------------------


def test_bools_take_the_majority_and_a_tie_keeps_the_global_value():
    ref = torch.tensor([True, False, True, False])
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([False, True, True, False])
    c = torch.tensor([False, True, False, True])

    assert merge_buffers(ref, [a, b]).tolist() == [True, True, True, False]
    assert merge_buffers(ref, [a, b, c]).tolist() == [False, True, False, False]
    assert merge_buffers(ref, [a]).tolist() == a.tolist()
    assert merge_buffers(ref, []).tolist() == ref.tolist()


# -- in a round -----------------------------------------------------------------------------------


def test_a_round_of_two_keeps_the_counter_from_a_hostile_contributor():
    # Prepare: the global weights after 40 batches; one honest node, one hostile
    glob = {"w": torch.zeros(3), "num_batches_tracked": torch.tensor(40)}
    honest = {"w": torch.ones(3), "num_batches_tracked": torch.tensor(50)}
    for hostile_count in (-(2**62), 2**62):
        acc = Accumulator(glob)
        acc.add("honest", honest, 10.0)
        acc.add(
            "hostile",
            {"w": torch.ones(3), "num_batches_tracked": torch.tensor(hostile_count)},
            10.0,
        )

        # Execute
        mean = acc.mean()

        # Assert: never below the global count, never past the honest one
        assert 40 <= int(mean["num_batches_tracked"]) <= 50
