"""The node's weights: fingerprint, upload payloads (whole weights or compressed changes), the
answer rebuilt and checked, in-place load and overlapped apply, local round copies. Torch only,
no Lightning, no network."""

from __future__ import annotations

import pytest
import torch
from support import wire

from lightning_drift import codec
from lightning_drift.aggregate import Accumulator, from_bytes, to_bytes
from lightning_drift.checkpoint import weights_name
from lightning_drift.errors import ConfigError
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.node.weights import (
    GlobalWeights,
    WeightsMismatch,
    apply_in_place,
    keep_round_copy,
    load_in_place,
    local_state,
    model_fingerprint,
    snapshot,
)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.norm = torch.nn.BatchNorm1d(2)  # float buffers and an integer one


def _answer(sd: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    blob = to_bytes(sd)
    return blob, sha256_bytes(blob)


def test_fingerprint_changes_with_shape_not_with_values():
    a, b = torch.nn.Linear(2, 3), torch.nn.Linear(2, 3)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(torch.nn.Linear(2, 4))


def test_float32_uploads_are_the_full_weights_and_keep_nothing():
    net = Net()
    held = GlobalWeights("float32")
    up = held.upload(local_state(net), upload_round=0)
    assert not up.delta and up.base_round == -1
    assert from_bytes(up.payload).keys() == net.state_dict().keys()
    blob, sha = _answer(net.state_dict())
    got = held.receive(3, blob, sha)
    assert got.round == 3 and got.blob == blob and got.payload == "weights"
    up = held.upload(local_state(net), upload_round=4)
    assert not up.delta  # float32 sessions never send deltas
    assert up.base_round == 3 and up.base_sha256 == ""  # nothing kept to be answered against
    for k, v in from_bytes(up.payload).items():
        assert torch.equal(v, net.state_dict()[k]), k


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_compressed_uploads_are_changes_from_the_held_round_after_the_start_up_sync(dtype):
    torch.manual_seed(0)
    net = Net()
    held = GlobalWeights(dtype)
    # Before any global weights (and at round 0) the upload is the full weights.
    assert not held.upload(local_state(net), upload_round=1).delta
    glob = {k: v.clone() for k, v in net.state_dict().items()}
    blob, sha = _answer(glob)
    held.receive(4, blob, sha)
    assert not held.upload(local_state(net), upload_round=0).delta
    with torch.no_grad():
        net.lin.weight.add_(0.5)
        net.norm.num_batches_tracked.add_(3)
    up = held.upload(local_state(net), upload_round=5)
    assert up.delta and up.base_round == 4 and up.base_sha256 == sha
    delta = codec.decode(up.payload, glob)
    assert torch.equal(delta["norm.num_batches_tracked"], net.norm.num_batches_tracked)
    # The coordinator rebuilds the node's weights as global + delta.
    acc = Accumulator(glob)
    acc.add("n", delta, 1.0, delta=True)
    rebuilt = acc.mean()
    assert torch.allclose(rebuilt["lin.weight"], net.lin.weight, atol=1e-2)
    assert torch.equal(rebuilt["lin.bias"], net.lin.bias)  # unchanged: a zero delta
    assert torch.equal(rebuilt["norm.num_batches_tracked"], net.norm.num_batches_tracked)
    raw = wire(up.payload, glob)  # the codec's own layout (docs/protocol.md)
    if dtype == "bfloat16":
        assert raw["values/lin.weight"].dtype == torch.bfloat16
    else:
        assert raw["codes/lin.weight"].dtype == torch.int8


def test_an_answer_that_does_not_match_its_checksum_is_refused():
    held = GlobalWeights("bfloat16")
    blob, _ = _answer(Net().state_dict())
    with pytest.raises(WeightsMismatch, match="round 2 do not match their checksum"):
        held.receive(2, blob, "0" * 64)
    assert held.base_round == -1  # nothing was taken from it


def test_a_compressed_answer_is_rebuilt_from_the_held_weights_and_checked():
    torch.manual_seed(1)
    glob = Net().state_dict()
    held = GlobalWeights("int8")
    blob, sha = _answer(glob)
    held.receive(1, blob, sha)
    # The coordinator's side: encode the change towards its target, apply it to its own copy.
    target = {k: v + 0.01 if v.is_floating_point() else v + 1 for k, v in glob.items()}
    enc = codec.encode(codec.difference(target, glob), "int8", codec.Residual())
    new = codec.apply(glob, enc.applied)
    new_blob, new_sha = _answer(new)
    got = held.receive(2, enc.payload, new_sha, payload="delta")
    assert got.blob == new_blob and got.round == 2  # bit for bit the coordinator's file
    assert held.base_sha256 == new_sha
    # Nothing changed: "same" gives the held weights back.
    again = held.receive(2, b"", new_sha, payload="same")
    assert again.blob == new_blob
    # A change that does not rebuild the round's weights is refused, and nothing is taken.
    with pytest.raises(WeightsMismatch, match="rebuilt from a 'delta' answer"):
        held.receive(3, enc.payload, "f" * 64, payload="delta")
    assert held.base_round == 2 and held.base_sha256 == new_sha


def test_the_start_up_sync_answered_same_keeps_the_offered_weights():
    net = Net()
    held = GlobalWeights("float32")
    up = held.offer(local_state(net))
    assert up.base_round == -1 and up.base_sha256 == sha256_bytes(up.payload)
    got = held.receive(0, b"", up.base_sha256, payload="same")
    assert got.blob == up.payload and got.round == 0
    with pytest.raises(WeightsMismatch, match="holds no weights with that sha256"):
        GlobalWeights("float32").receive(0, b"", up.base_sha256, payload="same")


def test_an_upload_that_did_not_count_drops_its_error_feedback():
    torch.manual_seed(2)
    net = Net()
    held = GlobalWeights("int8")
    blob, sha = _answer(net.state_dict())
    held.receive(1, blob, sha)
    with torch.no_grad():
        net.lin.weight.add_(torch.randn_like(net.lin.weight) * 1e-3)
    held.upload(local_state(net), upload_round=2)
    assert len(held.residual) > 0
    held.receive(1, b"", sha, payload="same", contributed=False)
    assert len(held.residual) == 0


def test_load_in_place_keeps_parameter_and_buffer_identity():
    net, other = Net(), Net()
    with torch.no_grad():
        other.lin.weight.fill_(1.5)
        other.norm.running_mean.fill_(0.25)
    params = [id(p) for p in net.parameters()]
    buffers = [id(b) for b in net.buffers()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    load_in_place(net, other.state_dict())
    assert [id(p) for p in net.parameters()] == params
    assert [id(b) for b in net.buffers()] == buffers
    assert opt.param_groups[0]["params"][0] is net.lin.weight
    assert torch.equal(net.lin.weight, other.lin.weight)
    assert torch.equal(net.norm.running_mean, other.norm.running_mean)
    with pytest.raises(ConfigError, match="6 added \\('lin.bias'"):
        load_in_place(net, {"lin.weight": other.lin.weight})  # every name must match


def test_round_copies_are_named_as_the_coordinator_names_its_checkpoints(tmp_path):
    path = keep_round_copy(tmp_path / "copies", 12, b"weights")
    assert path == tmp_path / "copies" / weights_name(12)
    assert path.name == "round-000012.safetensors"
    assert path.read_bytes() == b"weights"


class Tied(torch.nn.Module):
    """An embedding and an output layer that share one weight (as language models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight


def _train(module: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    module.train()
    for i in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
        module.lin(x).pow(2).sum().add(module.norm(module.lin(x)).sum()).backward()
        opt.step()


def test_an_overlapped_apply_is_global_plus_the_steps_taken_since_the_snapshot():
    # The node uploads a snapshot, trains on, and folds in the round's answer: every tensor
    # becomes global + (now - snapshot), in place, parameter identity and Adam's state kept.
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    _train(net, opt, 2)
    taken = snapshot(net)
    assert all(
        t.data_ptr() != v.data_ptr()
        for t, v in zip(taken.values(), local_state(net).values(), strict=True)
    )
    _train(net, opt, 3)  # trained on while the round was in flight
    now = {k: v.clone() for k, v in local_state(net).items()}
    assert not torch.equal(now["lin.weight"], taken["lin.weight"])  # the copy did not move
    g = {k: (v + 1 if v.is_floating_point() else v + 7) for k, v in taken.items()}
    params = {id(p) for p in net.parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}

    apply_in_place(net, g, taken)

    assert {id(p) for p in net.parameters()} == params
    assert {id(p) for p in opt.state} == params  # the optimizer still holds these parameters
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k  # its moments are untouched
    for k, v in local_state(net).items():
        assert torch.equal(v, (now[k] - taken[k]) + g[k]), k  # exactly, in this order
    assert int(local_state(net)["norm.num_batches_tracked"]) == 5 + 7  # counts add up
    _train(net, opt, 1)  # and training goes on from there


def test_an_apply_with_nothing_trained_since_the_snapshot_lands_on_the_global_weights():
    torch.manual_seed(1)
    net = Net()
    taken = snapshot(net)
    g = {k: (v * 3 if v.is_floating_point() else v) for k, v in taken.items()}
    apply_in_place(net, g, taken)
    for k, v in local_state(net).items():
        assert torch.equal(v, g[k]), k


def test_tied_weights_are_moved_once():
    torch.manual_seed(2)
    net = Tied()
    taken = snapshot(net)
    assert set(taken) == {"emb.weight", "out.weight"}
    with torch.no_grad():
        net.emb.weight.add_(0.5)  # a local step
    g = {k: v + 1 for k, v in taken.items()}
    apply_in_place(net, g, taken)
    assert net.out.weight is net.emb.weight
    expected = (taken["emb.weight"] + 0.5 - taken["emb.weight"]) + g["emb.weight"]
    assert torch.equal(net.emb.weight, expected)  # once, not twice


def test_an_apply_refuses_weights_of_another_model():
    net = Net()
    taken = snapshot(net)
    other = {k: v for k, v in taken.items() if k != "lin.bias"}
    with pytest.raises(ConfigError, match="lin.bias"):
        apply_in_place(net, other, taken)


def test_a_residual_kept_in_the_weights_is_trained_on_from_and_not_sent_twice():
    # --residual weights: what the codec left out of an upload goes into the weights the
    # node starts its next round from, not into its next change; the final round is exact.
    torch.manual_seed(3)
    net = Net()
    held = GlobalWeights("sign", in_weights=True)
    glob = {k: v.clone() for k, v in net.state_dict().items()}
    blob, sha = _answer(glob)
    held.receive(1, blob, sha)
    with torch.no_grad():
        net.lin.weight.add_(torch.randn_like(net.lin.weight) * 1e-2)
    local = local_state(net)
    up = held.upload(local, upload_round=2)
    sent = codec.decode(up.payload, glob)
    true = local["lin.weight"] - glob["lin.weight"]
    assert torch.equal(held.residual.get("lin.weight"), true - sent["lin.weight"])
    same = held.receive(2, b"", sha, payload="same")  # (the round changed nothing)
    start = held.start(same, final=False)
    # global + what was left out: the node's own weights, less what it sent
    assert torch.allclose(start["lin.weight"], local["lin.weight"] - sent["lin.weight"])
    assert torch.equal(start["norm.num_batches_tracked"], glob["norm.num_batches_tracked"])
    assert held.start(same, final=True) is same.weights  # the final round: exactly
    # From there the next change holds the residual once: no error feedback is added to it.
    with torch.no_grad():
        load_in_place(net, start)
    again = codec.decode(held.upload(local_state(net), upload_round=3).payload, glob)
    plain = codec.decode(codec.encode(codec.difference(start, glob), "sign").payload, glob)
    assert torch.equal(again["lin.weight"], plain["lin.weight"])


def test_the_residual_stays_out_of_the_weights_unless_the_session_says_so():
    torch.manual_seed(4)
    net = Net()
    for held in (GlobalWeights("int8"), GlobalWeights("float32", in_weights=True)):
        blob, sha = _answer(net.state_dict())
        got = held.receive(1, blob, sha)
        held.upload(local_state(net), upload_round=2)
        assert held.start(got, final=False) is got.weights
