"""Aggregation: exact weighted mean, buffers, validation, delta uploads, DiLoCo, safetensors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from lightning_drift.aggregate import (
    OUTER_LR,
    OUTER_MOMENTUM,
    Accumulator,
    DiLoCo,
    StateDict,
    from_bytes,
    merge_buffers,
    outer_settings,
    to_bytes,
    validate_upload,
    weighed,
)
from lightning_drift.errors import ConfigError, SessionError

FLOAT_KEYS = ("w32", "b16", "h16", "d64")


def global_model(seed: int = 0) -> StateDict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w32": torch.randn(4, 3, generator=g),
        "b16": torch.randn(5, generator=g).to(torch.bfloat16),
        "h16": torch.randn(2, 2, generator=g).to(torch.float16),
        "d64": torch.randn(3, generator=g, dtype=torch.float64),
        "steps": torch.tensor(10, dtype=torch.int64),
        "mask": torch.tensor([True, False, False]),
        "u8": torch.tensor([1, 7, 3], dtype=torch.uint8),
    }


def perturbed(ref: StateDict, seed: int) -> StateDict:
    """A node's upload: the global model moved a little, buffers changed."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for k, t in ref.items():
        if t.is_floating_point():
            out[k] = (t.double() + 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(
                t.dtype
            )
        elif t.dtype == torch.bool:
            out[k] = torch.rand(t.shape, generator=g) < 0.5
        else:
            out[k] = t + torch.randint(0, 5, t.shape, generator=g, dtype=t.dtype)
    return out


def snapshot(acc: Accumulator) -> tuple:
    return ([t.clone() for t in acc.tensors()], list(acc.contributors), acc.total_weight)


def same_snapshot(a: tuple, b: tuple) -> bool:
    return (
        len(a[0]) == len(b[0])
        and all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True))
        and a[1:] == b[1:]
    )


# -- weighted mean --------------------------------------------------------------------------


def test_weighted_mean_equals_the_hand_computation_to_the_bit():
    # Prepare
    glob = global_model()
    uploads = [("n1", perturbed(glob, 1), 3.0), ("n2", perturbed(glob, 2), 5.0)]
    uploads.append(("n3", perturbed(glob, 3), 2.0))
    acc = Accumulator(glob)

    # Execute
    for node, sd, w in uploads:
        acc.add(node, sd, w)
    mean = acc.mean()

    # Assert
    for k in FLOAT_KEYS:
        hand = torch.zeros(glob[k].shape, dtype=torch.float64)
        for _, sd, w in uploads:
            hand = hand + sd[k].double() * w
        expected = (hand / 10.0).to(glob[k].dtype)
        assert mean[k].dtype == glob[k].dtype
        assert torch.equal(mean[k], expected), k
    assert list(mean) == list(glob)
    assert acc.contributors == [("n1", 3.0), ("n2", 5.0), ("n3", 2.0)]
    assert acc.total_weight == 10.0


def test_same_uploads_in_the_same_order_give_identical_bits():
    glob = global_model()
    ups = [perturbed(glob, i) for i in range(4)]

    means = []
    for _ in range(2):
        acc = Accumulator(glob)
        for i, sd in enumerate(ups):
            acc.add(f"n{i}", sd, float(i + 1))
        means.append(acc.mean())

    assert all(torch.equal(means[0][k], means[1][k]) for k in glob)


def test_integer_and_bool_buffers_never_take_one_nodes_value():
    # Prepare: global steps 10, mask [T, F, F], u8 [1, 7, 3]; c is hostile (2^62 steps).
    glob = global_model()
    a, b, c = perturbed(glob, 1), perturbed(glob, 2), perturbed(glob, 3)
    a["steps"], b["steps"], c["steps"] = torch.tensor(12), torch.tensor(15), torch.tensor(2**62)
    a["mask"], b["mask"] = torch.tensor([True, False, False]), torch.tensor([False, False, True])
    c["mask"] = torch.tensor([False, True, True])
    a["u8"], b["u8"], c["u8"] = (
        torch.tensor([9, 0, 3], dtype=torch.uint8),
        torch.tensor([1, 8, 3], dtype=torch.uint8),
        torch.tensor([255, 255, 255], dtype=torch.uint8),
    )
    acc = Accumulator(glob)

    # Execute
    acc.add("a", a, 1.0)
    acc.add("b", b, 100.0)
    acc.add("c", c, 1.0)
    mean = acc.mean()

    # Assert: global + the median increment (steps +5, not +2^62); bools: the majority.
    assert torch.equal(mean["steps"], torch.tensor(15))
    assert torch.equal(mean["mask"], torch.tensor([False, False, True]))
    assert torch.equal(mean["u8"], torch.tensor([9, 8, 3], dtype=torch.uint8))
    assert mean["u8"].dtype == torch.uint8 and mean["mask"].dtype == torch.bool


def test_uploads_are_not_modified():
    glob = global_model()
    up = perturbed(glob, 1)
    up["d64"] = up["d64"].clone()  # float64: a .to(float64) would alias it
    before = {k: v.clone() for k, v in up.items()}
    glob_before = {k: v.clone() for k, v in glob.items()}

    acc = Accumulator(glob)
    acc.add("a", up, 3.0)
    acc.add("b", {k: v.clone() for k, v in up.items()}, 1.0, delta=False)

    assert all(torch.equal(up[k], before[k]) for k in up)
    assert all(torch.equal(glob[k], glob_before[k]) for k in glob)


# -- bad uploads ----------------------------------------------------------------------------


def _nan(sd):
    sd["w32"][1, 2] = float("nan")


def _inf(sd):
    sd["b16"][0] = float("-inf")


def _shape(sd):
    sd["w32"] = torch.zeros(3, 4)


def _dtype(sd):
    sd["w32"] = sd["w32"].double()


def _int_dtype(sd):
    sd["steps"] = sd["steps"].to(torch.int32)


def _missing(sd):
    del sd["h16"]


def _extra(sd):
    sd["head.bias"] = torch.zeros(2)


def _not_tensor(sd):
    sd["d64"] = [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_nan, r"upload tensor 'w32' holds 1 non-finite value\(s\) \(NaN or inf\)"),
        (_inf, r"upload tensor 'b16' holds 1 non-finite value"),
        (_shape, r"upload tensor 'w32' has shape \(3, 4\), the global model has \(4, 3\)"),
        (_dtype, r"upload tensor 'w32' has dtype float64, the global model has float32"),
        (_int_dtype, r"upload tensor 'steps' has dtype int32, the global model has int64"),
        (_missing, r"upload has missing 1 tensor\(s\) of the global model: 'h16'"),
        (_extra, r"upload has 1 tensor\(s\) not in the global model: 'head.bias'"),
        (_not_tensor, r"upload entry 'd64' is a list, not a tensor"),
    ],
)
def test_bad_upload_is_refused_and_changes_nothing(corrupt, message):
    # Prepare
    glob = global_model()
    acc = Accumulator(glob)
    acc.add("good", perturbed(glob, 1), 4.0)
    before = snapshot(acc)
    bad = perturbed(glob, 2)
    corrupt(bad)

    # Execute
    with pytest.raises(SessionError, match=message) as exc:
        acc.add("bad", bad, 4.0)

    # Assert
    assert exc.value.code == "bad_upload"
    assert same_snapshot(before, snapshot(acc))
    assert acc.contributors == [("good", 4.0)]


def test_validate_upload_names_the_first_offending_tensor_in_model_order():
    glob = global_model()
    bad = perturbed(glob, 1)
    bad["h16"][0, 0] = float("nan")
    bad["d64"] = torch.zeros(7, dtype=torch.float64)

    with pytest.raises(SessionError, match="'h16'"):
        validate_upload(glob, bad)


def test_validate_upload_accepts_a_good_upload():
    glob = global_model()

    validate_upload(glob, perturbed(glob, 1))


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_bad_weight_is_refused(weight):
    acc = Accumulator(global_model())

    with pytest.raises(SessionError, match="not a finite number >= 0"):
        acc.add("a", perturbed(global_model(), 1), weight)
    assert acc.contributors == []


def test_a_node_counts_once_per_round():
    glob = global_model()
    acc = Accumulator(glob)
    acc.add("a", perturbed(glob, 1), 1.0)

    with pytest.raises(SessionError, match="already contributed") as exc:
        acc.add("a", perturbed(glob, 2), 1.0)
    assert exc.value.code == "duplicate_upload"


def test_mean_of_nothing_is_an_error():
    glob = global_model()
    acc = Accumulator(glob)
    with pytest.raises(SessionError, match="no uploads"):
        acc.mean()

    acc.add("a", perturbed(glob, 1), 0.0)
    with pytest.raises(SessionError, match="weight 0"):
        acc.mean()


# -- delta uploads --------------------------------------------------------------------------


def test_delta_upload_in_bfloat16_contributes_global_plus_delta():
    # Prepare
    glob = global_model()
    local_a, local_b = perturbed(glob, 1), perturbed(glob, 2)
    delta_a = {
        k: (v.float() - glob[k].float()).to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in local_a.items()
    }
    acc = Accumulator(glob)

    # Execute
    acc.add("a", delta_a, 2.0, delta=True)
    acc.add("b", local_b, 3.0)  # delta and full uploads can mix in one round
    mean = acc.mean()

    # Assert
    for k in FLOAT_KEYS:
        hand = torch.zeros(glob[k].shape, dtype=torch.float64)
        hand = hand + (glob[k].double() + delta_a[k].double()) * 2.0
        hand = hand + local_b[k].double() * 3.0
        assert torch.equal(mean[k], (hand / 5.0).to(glob[k].dtype)), k
    assert torch.equal(
        mean["steps"], merge_buffers(glob["steps"], [local_a["steps"], local_b["steps"]])
    )


def test_reduced_precision_is_refused_for_full_weights_but_not_for_deltas():
    glob = global_model()
    up = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in glob.items()}
    acc = Accumulator(glob)

    with pytest.raises(SessionError, match="'w32' has dtype bfloat16"):
        acc.add("a", up, 1.0)
    acc.add("a", up, 1.0, delta=True)

    assert len(acc) == 1


def test_delta_upload_with_nan_is_refused():
    glob = global_model()
    delta = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in glob.items()}
    delta["d64"][0] = float("nan")
    acc = Accumulator(glob)

    with pytest.raises(SessionError, match="'d64' holds 1 non-finite"):
        acc.add("a", delta, 1.0, delta=True)
    assert acc.contributors == []


# -- memory ---------------------------------------------------------------------------------


def test_accumulator_holds_one_float64_copy_however_many_uploads():
    # Prepare: the floating sums are one float64 copy; only the (small) integer and bool
    # buffers are kept per contributor, for their median.
    glob = global_model()
    float_bytes = sum(glob[k].numel() * 8 for k in FLOAT_KEYS)
    buffer_bytes = sum(v.numel() * v.element_size() for k, v in glob.items() if k not in FLOAT_KEYS)
    buffers = len(glob) - len(FLOAT_KEYS)
    acc = Accumulator(glob)
    acc.add("n0", perturbed(glob, 0), 1.0)
    after_one = (len(acc.tensors()), acc.nbytes())
    refs = []

    # Execute
    for i in range(1, 12):
        up = perturbed(glob, i)
        refs.extend(weakref.ref(t) for t in up.values())
        acc.add(f"n{i}", up, 1.0)
        del up
    gc.collect()

    # Assert
    assert after_one == (len(glob), float_bytes + buffer_bytes)
    assert (len(acc.tensors()), acc.nbytes()) == (
        len(FLOAT_KEYS) + 12 * buffers,
        float_bytes + 12 * buffer_bytes,
    )
    assert all(t.dtype == torch.float64 for t in acc.tensors()[: len(FLOAT_KEYS)])
    assert all(r() is None for r in refs), "the accumulator must not keep uploads alive"


# -- DiLoCo ---------------------------------------------------------------------------------


def _means(glob: StateDict, step: int) -> StateDict:
    g = torch.Generator().manual_seed(500 + step)
    return {
        k: (v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype))
        if v.is_floating_point()
        else v + step
        for k, v in glob.items()
    }


@pytest.mark.parametrize(
    ("lr", "momentum", "nesterov"), [(0.7, 0.9, True), (0.5, 0.8, False), (1.0, 0.0, False)]
)
def test_diloco_follows_torch_sgd(lr, momentum, nesterov):
    # Prepare
    g = torch.Generator().manual_seed(3)
    glob = {
        "w": torch.randn(8, 5, generator=g),
        "d": torch.randn(6, generator=g, dtype=torch.float64),
        "steps": torch.tensor(1),
    }
    ref_params = {k: v.clone() for k, v in glob.items() if v.is_floating_point()}
    opt = torch.optim.SGD(
        list(ref_params.values()), lr=lr, momentum=momentum, nesterov=nesterov, dampening=0
    )
    outer = DiLoCo(lr=lr, momentum=momentum, nesterov=nesterov)

    for step in range(5):
        mean = _means(glob, step)

        # Execute
        new = outer.step(glob, mean)
        for k, p in ref_params.items():
            p.grad = glob[k] - mean[k]
        opt.step()

        # Assert: SGD's formula, up to rounding. Not to the bit: SGD's kernel fuses a
        # multiply and an add where the CPU's vector kernels allow (so its bits depend on the
        # CPU); DiLoCo computes each operation on its own in float64 so that they do not.
        for k, p in ref_params.items():
            assert new[k].dtype == p.dtype
            tol = 1e-6 if p.dtype == torch.float32 else 1e-14
            torch.testing.assert_close(new[k], p.detach(), rtol=tol, atol=tol)
        assert torch.equal(new["steps"], mean["steps"])
        glob = new


def test_diloco_momentum_survives_a_save_and_load():
    glob = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(1))}
    a = DiLoCo()
    g1 = a.step(glob, _means(glob, 0))
    b = DiLoCo()

    b.load_state_dict(from_bytes(to_bytes(a.state_dict())))
    mean = _means(g1, 1)

    assert torch.equal(a.step(g1, mean)["w"], b.step(g1, mean)["w"])


def test_diloco_steps_half_precision_and_keeps_float32_momentum():
    glob = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(2)).bfloat16()}
    mean = {"w": (glob["w"].float() * 0.9).bfloat16()}
    p = glob["w"].float().clone()
    p.grad = glob["w"].float() - mean["w"].float()
    torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True).step()
    outer = DiLoCo(lr=0.7, momentum=0.9)

    new = outer.step(glob, mean)

    assert new["w"].dtype == torch.bfloat16
    assert outer.state_dict()["w"].dtype == torch.float32  # as checkpoints hold it
    # SGD's formula up to rounding (computed in float64, DiLoCo may round the other way)
    torch.testing.assert_close(new["w"], p.detach().bfloat16(), rtol=2**-7, atol=1e-6)
    assert DiLoCo().state_dict() == {}


@pytest.mark.parametrize(("lr", "momentum"), [(0.7, 0.6), (0.7, 0.9), (1.0, 0.3)])
def test_diloco_steps_grow_with_the_momentum_as_documented(lr, momentum):
    # A pseudo-gradient that keeps its direction: round t moves the weights by
    # lr * (1 + m * (1 - m**t) / (1 - m)) times the mean's own change.
    outer = DiLoCo(lr=lr, momentum=momentum)
    glob = {"w": torch.zeros(8, dtype=torch.float64)}
    change = torch.full((8,), 1e-3, dtype=torch.float64)
    for t in range(1, 17):
        new = outer.step(glob, {"w": glob["w"] + change})
        step = float((new["w"] - glob["w"]).mean() / change.mean())
        m = momentum
        assert step == pytest.approx(lr * (1 + m * (1 - m**t) / (1 - m)), rel=1e-9), t
        glob = new
    assert step == pytest.approx(lr / (1 - momentum), rel=0.05 if momentum < 0.9 else 0.2)


def test_diloco_defaults_are_the_measured_ones():
    # docs/benchmarks.md, outer_sweep.py: the coordinator's defaults. The outer lr follows the
    # round's contributors (0: aggregate.OUTER_LR's), the momentum is DiLoCo's default.
    from lightning_drift.coordinator.config import SETTING

    assert DiLoCo().momentum == OUTER_MOMENTUM == SETTING["outer_momentum"].default
    assert SETTING["outer_lr"].default == 0 and SETTING["outer_warmup"].default == 0
    for n, lr in OUTER_LR:
        assert outer_settings(n, 7) == (lr, OUTER_MOMENTUM), n


def test_the_outer_lr_follows_the_contributors_between_the_measured_counts():
    lrs = [outer_settings(n, 5)[0] for n in range(1, 65)]
    table = dict(OUTER_LR)
    for n in range(1, 65):
        below = max(k for k in table if k <= n)
        above = min((k for k in table if k >= n), default=below)
        lo, hi = sorted((table[below], table[above]))
        assert lo <= lrs[n - 1] <= hi, n  # between its neighbours' values
    assert lrs[63] == OUTER_LR[-1][1]  # beyond the last count the lr stays
    assert outer_settings(0, 5) == outer_settings(1, 5)  # a round of no weight: as for one


def test_an_explicit_outer_lr_stands_and_warmup_ramps_it_up_linearly():
    assert outer_settings(8, 1, lr=0.5, momentum=0.3) == (0.5, 0.3)
    ramp = [outer_settings(4, r, lr=0.9, warmup=4)[0] for r in range(1, 7)]
    assert ramp == pytest.approx([0.225, 0.45, 0.675, 0.9, 0.9, 0.9])
    assert outer_settings(4, 0, lr=0.9, warmup=4)[0] == pytest.approx(0.225)  # round 0: as 1
    assert weighed([("a", 3.0), ("b", 0.0), ("c", 1.0)]) == 2


def test_diloco_refuses_mismatched_tensors_and_bad_config():
    with pytest.raises(SessionError, match="different tensors: 'b'"):
        DiLoCo().step({"a": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)})
    with pytest.raises(ConfigError, match="momentum > 0"):
        DiLoCo(momentum=0.0, nesterov=True)


# -- safetensors ----------------------------------------------------------------------------


def test_to_bytes_round_trips_shared_and_strided_tensors():
    # Prepare: tied weights (same storage), a transposed view, an empty tensor
    base = torch.randn(3, 4)
    sd = {
        "emb": base,
        "head": base,
        "row": base[1],
        "t": base.t(),
        "empty": torch.empty(0),
        "n": torch.tensor(3),
    }

    # Execute
    out = from_bytes(to_bytes(sd))

    # Assert
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert torch.equal(out[k], v), k
    assert to_bytes(sd) == to_bytes({k: v.clone() for k, v in sd.items()})  # deterministic


def test_to_bytes_casts_floating_tensors_only():
    sd = {"w": torch.randn(3), "n": torch.tensor([1, 2], dtype=torch.int64)}

    out = from_bytes(to_bytes(sd, dtype=torch.bfloat16))

    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], sd["w"].bfloat16())
    assert out["n"].dtype == torch.int64
    with pytest.raises(ConfigError, match="not a floating dtype"):
        to_bytes(sd, dtype=torch.int32)


def test_from_bytes_refuses_garbage():
    with pytest.raises(SessionError, match="not a valid safetensors state dict") as exc:
        from_bytes(b"\x00\x01 this is not safetensors")
    assert exc.value.code == "bad_upload"
