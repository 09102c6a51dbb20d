"""Buffers that are non-finite by design (an additive causal mask of -inf) through every path
the weights take, without a network: the start-up sync, uploads of whole weights and of
bfloat16 and int8 changes, the mean, DiLoCo and robust aggregation, the check before new
global weights are written, the checkpoint, the node's rebuild and the overlapped apply. They
are carried bit for bit; divergence is still told apart and refused as such."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_drift import codec
from lightning_drift.aggregate import (
    Accumulator,
    DiLoCo,
    check_aggregate,
    from_bytes,
    to_bytes,
    validate_upload,
)
from lightning_drift.checkpoint import CheckpointStore
from lightning_drift.coordinator.aggregation import Aggregation
from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.modelspec import carried, same_bits
from lightning_drift.node.weights import (
    GlobalWeights,
    apply_in_place,
    check_start,
    local_state,
    snapshot,
)
from lightning_drift.robust import RobustAccumulator

T = 4


class Causal(torch.nn.Module):
    """A layer with an additive causal mask: -inf above the diagonal, 0 (and one -0.0) below."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(T, T)
        mask = torch.triu(torch.full((T, T), float("-inf")), 1)
        mask[T - 1, 0] = -0.0  # a sign a sum of changes would lose
        self.register_buffer("mask", mask)
        self.norm = torch.nn.BatchNorm1d(T)  # finite float buffers and an integer one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm((self.lin(x) @ self.mask.softmax(-1)).relu())


def train(module: Causal, seed: int, steps: int = 2) -> None:
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        module(torch.randn(8, T, generator=g)).pow(2).mean().backward()
        opt.step()


MASK = Causal().mask.clone()


def assert_mask(t: torch.Tensor) -> None:
    assert same_bits(t.detach().cpu(), MASK), t


def test_only_the_non_finite_buffer_is_carried_and_the_start_up_sync_takes_it():
    m = Causal()
    sd = local_state(m)
    assert carried(sd) == {"mask"}
    check_start(m)  # a buffer may be non-finite by design
    validate_upload(sd, sd)  # the coordinator adopts such start-up weights
    with torch.no_grad():
        m.lin.weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="parameter 'lin.weight' holds 1 non-finite") as err:
        check_start(m)  # a parameter may not
    assert "diverged" in str(err.value)


def _round(dtype: str, method: str, tmp_path: Path) -> None:
    """Two nodes and the coordinator's numerics for rounds 1 and 2 (the second with momentum)."""
    config = SessionConfig(
        dataset_size=100,
        transfer_dtype=dtype,
        aggregation="diloco" if method == "diloco" else "mean",
        robust=method if method in ("median", "trimmed") else "off",
    )
    aggregation = Aggregation(config, CheckpointStore(tmp_path), clock=lambda: 0.0)
    nodes = [Causal(0), Causal(0)]
    helds = [GlobalWeights(dtype) for _ in nodes]
    global_sd = {k: v.clone() for k, v in local_state(nodes[0]).items()}
    blob = to_bytes(global_sd)
    for h in helds:
        h.receive(0, blob, sha256_bytes(blob))
    for upload_round in (1, 2):
        acc = aggregation.new_accumulator(global_sd)
        taken = []
        for i, (m, h) in enumerate(zip(nodes, helds, strict=True)):
            train(m, 10 * upload_round + i)
            h.check(local_state(m))
            taken.append(snapshot(m))
            up = h.upload(taken[-1], upload_round)
            assert up.delta == (dtype != "float32")
            sd = codec.decode(up.payload, global_sd) if up.delta else from_bytes(up.payload)
            acc.add(f"n{i}", sd, 10.0 + i, delta=up.delta)
        new_sd, blob, info, refused, change = aggregation.run("s", upload_round, 0, acc, global_sd)
        assert refused is None
        assert_mask(new_sd["mask"])
        assert_mask(from_bytes(info.path.read_bytes())["mask"])  # the checkpoint holds it too
        sha = sha256_bytes(blob)
        for m, h, t in zip(nodes, helds, taken, strict=True):
            train(m, 99)  # a step trained while the round travelled
            if change is None:
                got = h.receive(upload_round, blob, sha)
            else:
                got = h.receive(upload_round, change[0], sha, payload="delta")
            assert got.blob == blob and got.carried == {"mask"}
            apply_in_place(m, got.weights, t, got.carried)
            assert_mask(m.mask)
            assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
        assert not torch.equal(new_sd["lin.weight"], global_sd["lin.weight"])  # it trained
        global_sd = new_sd


@pytest.mark.parametrize("method", ["mean", "diloco", "median"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_round_carries_the_mask_bit_for_bit_on_every_path(dtype, method, tmp_path):
    _round(dtype, method, tmp_path)


def test_a_node_that_changes_the_mask_is_stopped_naming_it_not_called_divergent():
    m = Causal()
    held = GlobalWeights("int8")
    blob = to_bytes(local_state(m))
    held.receive(0, blob, sha256_bytes(blob))
    with torch.no_grad():
        m.mask[0, 0] = 1.0  # a finite value of the mask changed
    with pytest.raises(ConfigError, match="buffer 'mask' holds non-finite values") as err:
        held.check(local_state(m))
    assert "persistent=False" in str(err.value) and "diverged" not in str(err.value)


def test_the_coordinator_refuses_a_changed_mask_by_name_and_divergence_as_divergence():
    glob = local_state(Causal())
    acc = Accumulator(glob)
    changed = {k: v.clone() for k, v in glob.items()}
    changed["mask"][0, 0] = 1.0
    with pytest.raises(SessionError, match="buffer 'mask' holds non-finite") as err:
        acc.add("whole", changed, 1.0)
    assert "diverged" not in str(err.value) and err.value.code == "bad_upload"
    delta = codec.difference(changed, glob)
    assert delta["mask"][0, 0] == 1.0 and bool(torch.isfinite(delta["mask"]).all())
    with pytest.raises(SessionError, match="buffer 'mask' holds non-finite"):
        acc.add("delta", delta, 1.0, delta=True)
    # A finite buffer that turned non-finite, and a parameter that did: divergence.
    for name in ("norm.running_var", "lin.weight"):
        bad = {k: v.clone() for k, v in glob.items()}
        bad[name].view(-1)[0] = float("inf")
        with pytest.raises(SessionError, match=f"'{name}' holds 1 non-finite.*diverged"):
            acc.add(name, bad, 1.0)
    assert len(acc) == 0  # nothing refused was counted


def test_the_check_before_writing_keeps_the_mask_and_still_refuses_non_finite_values():
    old = local_state(Causal())
    assert check_aggregate(old, old, 10.0) is None
    moved = {k: v.clone() for k, v in old.items()}
    moved["mask"][T - 1, 0] = 0.0  # -0.0 became 0.0: not the model's mask any more
    assert "'mask', non-finite by design, changed" in (check_aggregate(old, moved, 10.0) or "")
    nan = {k: v.clone() for k, v in old.items()}
    nan["norm.running_mean"][0] = float("nan")
    assert "holds 1 non-finite" in (check_aggregate(old, nan, 10.0) or "")


def test_changes_of_a_carried_tensor_are_zero_and_applying_keeps_its_bits():
    old = local_state(Causal())
    new = {k: v.clone() for k, v in old.items()}
    change = codec.difference(new, old)
    assert torch.equal(change["mask"], torch.zeros(T, T))  # not -inf - -inf = NaN
    for name in codec.CODECS:
        enc = codec.encode(change, name, codec.Residual())
        back = codec.apply(old, codec.decode(enc.payload, old))
        assert_mask(back["mask"])
    outer = DiLoCo()
    for _ in range(2):
        assert_mask(outer.step(old, new)["mask"])
    robust = RobustAccumulator(old, method="trimmed")
    for i in range(3):
        robust.add(str(i), change, 1.0, delta=True)
    assert_mask(robust.mean()["mask"])
