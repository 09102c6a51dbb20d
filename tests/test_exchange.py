"""The round engine without a Trainer: a bare torch module, a fake clock and a stand-in for
the runtime at the network edge (it answers each upload the way the coordinator would, on
demand, so a test decides when a round's weights arrive)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest
import torch
from torch.nn.utils import prune

from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.node.exchange import BarrierRecord, RoundExchange
from lightning_drift.node.pace import PaceMeter
from lightning_drift.node.runtime import Delivery
from lightning_drift.node.weights import GlobalWeights
from lightning_drift.protocol import BarrierReady, BarrierSync


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Network:
    """Holds each hand-off until :meth:`answer`: the coordinator's global weights of the
    upload's round (whole), or an error, or a wrong sha256."""

    def __init__(self, global_weights: dict[str, torch.Tensor]) -> None:
        self.glob = global_weights
        self.pending: list[tuple[Any, Any, Future]] = []
        self.uploads: list[tuple[BarrierSync, bytes]] = []

    def hand_off(self, prepare, receive) -> Future:
        fut: Future = Future()
        self.pending.append((prepare, receive, fut))
        return fut

    def answer(self, *, sha256: str | None = None, error: BaseException | None = None) -> None:
        prepare, receive, fut = self.pending.pop(0)
        sync, payload = prepare()
        self.uploads.append((sync, payload))
        if error is not None:
            fut.set_exception(error)
            return
        blob = to_bytes(self.glob)
        ready = BarrierReady(round=sync.round, sha256=sha256 or sha256_bytes(blob))
        try:
            fut.set_result(Delivery(sync, payload, ready, blob, receive(ready, blob)))
        except BaseException as exc:
            fut.set_exception(exc)


def answer_at_once(net: Network) -> None:
    """From now on every hand-off is answered as soon as it is made."""
    hand_off = net.hand_off

    def answered(prepare, receive) -> Future:
        fut = hand_off(prepare, receive)
        net.answer()
        return fut

    net.hand_off = answered  # type: ignore[method-assign]


def engine(module: torch.nn.Module, network: Network) -> tuple[RoundExchange, Clock]:
    clock = Clock()
    return RoundExchange(network, GlobalWeights(), module, PaceMeter(clock)), clock


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((2, 3), value), "bias": torch.full((2,), value)}


def module_at(value: float) -> torch.nn.Linear:
    m = torch.nn.Linear(3, 2)
    m.load_state_dict(weights(value))
    return m


def test_an_overlapped_round_folds_the_steps_trained_meanwhile_into_the_global_weights():
    m, net = module_at(1.0), Network(weights(5.0))
    rounds, clock = engine(m, net)
    rounds.hand_off(BarrierSync(round=3, samples=7), overlap=True)
    param = m.weight
    with torch.no_grad():
        m.weight.add_(0.5)  # a step trained while the round travels
    assert not rounds.arrived and rounds.in_flight is not None and rounds.in_flight.overlapped
    net.answer()
    clock.now += 2.0
    assert rounds.arrived
    record = rounds.settle()
    assert isinstance(record, BarrierRecord)
    assert (record.round, record.overlapped, record.samples, record.contributed) == (3, True, 7, True)
    assert record.round_trip_s == pytest.approx(2.0)
    assert torch.equal(m.weight, torch.full((2, 3), 5.5))  # global + (now - copy)
    assert torch.equal(m.bias, torch.full((2,), 5.0))
    assert m.weight is param  # in place: the optimizer keeps its parameters
    assert rounds.base_round == 3 and rounds.in_flight is None
    # The upload was the copy taken at the barrier, not the weights trained since.
    assert torch.equal(from_bytes(net.uploads[0][1])["weight"], torch.full((2, 3), 1.0))


def test_a_blocking_round_loads_the_global_weights_exactly():
    m, net = module_at(1.0), Network(weights(4.0))
    rounds, _ = engine(m, net)
    rounds.hand_off(BarrierSync(round=1), overlap=False)
    net.answer()
    record = rounds.settle()
    assert record is not None and not record.overlapped
    assert torch.equal(m.weight, torch.full((2, 3), 4.0))
    assert rounds.settle() is None  # nothing in flight


def test_weights_that_fail_their_sha256_are_fetched_whole_and_the_base_round_waits():
    m, net = module_at(1.0), Network(weights(3.0))
    rounds, _ = engine(m, net)
    rounds.hand_off(BarrierSync(round=2, epoch=1), overlap=False)
    net.answer(sha256="0" * 64)  # the answer does not verify
    answer_at_once(net)  # the refetch (a start-up sync offering nothing) is answered at once
    assert rounds.base_round == -1
    record = rounds.settle()
    assert record is not None and record.round == 0 and not record.contributed
    assert record.bytes_sent == 0
    refetch, offered = net.uploads[-1]
    assert (refetch.round, refetch.epoch, offered) == (0, 1, b"")
    assert torch.equal(m.weight, torch.full((2, 3), 3.0)) and rounds.base_round == 0


def test_a_coordinator_without_weights_is_sent_the_nodes_own_whole():
    m, net = module_at(2.0), Network(weights(2.0))
    rounds, _ = engine(m, net)
    rounds.has_weights = True  # the session said it has weights: round 0 offers none
    rounds.hand_off(BarrierSync(round=0), overlap=False)
    net.answer(error=SessionError("the coordinator lost its weights", "need_weights"))
    answer_at_once(net)
    record = rounds.settle()
    assert record is not None and record.round == 0
    first, second = net.uploads
    assert first[1] == b"" and second[1] != b""  # the whole weights, sent on request
    assert torch.equal(from_bytes(second[1])["weight"], torch.full((2, 3), 2.0))


def test_a_coordinator_that_asks_for_the_whole_weights_again_is_refused_not_fed_for_ever():
    m, net = module_at(2.0), Network(weights(2.0))
    rounds, _ = engine(m, net)
    rounds.has_weights = True
    rounds.hand_off(BarrierSync(round=0), overlap=False)

    def always_asks(prepare, receive) -> Future:
        fut: Future = Future()
        net.uploads.append(prepare())
        fut.set_exception(SessionError("the coordinator lost its weights", "need_weights"))
        return fut

    net.answer(error=SessionError("the coordinator lost its weights", "need_weights"))
    net.hand_off = always_asks  # type: ignore[method-assign]
    with pytest.raises(SessionError, match="whole weights again") as err:
        rounds.settle()
    assert err.value.code == "protocol" and rounds.in_flight is None
    assert len(net.uploads) == 2  # the empty offer, then the whole weights once


def test_a_stale_base_names_the_round_the_node_holds_and_other_errors_pass_through():
    m, net = module_at(1.0), Network(weights(1.0))
    rounds, _ = engine(m, net)
    rounds.hand_off(BarrierSync(round=2), overlap=False)
    net.answer()
    rounds.settle()
    # A node whose base is round 2 uploads for round 5 (it was left behind): the upload
    # names its base, so the coordinator can tell a stale base from a current one.
    rounds.hand_off(BarrierSync(round=5), overlap=True)
    net.answer(error=SessionError("upload left out: stale base", "bad_upload"))
    assert net.uploads[-1][0].base_round == 2
    with pytest.raises(SessionError, match="stale base"):
        rounds.settle()
    assert rounds.in_flight is None and rounds.base_round == 2


class Pruned(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
        )


def synced(dtype: str) -> tuple[Pruned, Network, RoundExchange]:
    """A node past its start-up sync, holding the session's weights (a copy of its own)."""
    m = Pruned()
    net = Network({k: v.clone() for k, v in m.state_dict().items()})
    rounds = RoundExchange(net, GlobalWeights(dtype), m, PaceMeter(Clock()))  # type: ignore[arg-type]
    rounds.hand_off(BarrierSync(round=0), overlap=False)
    net.answer()
    rounds.settle()
    return m, net, rounds


def assert_names_the_pruned_tensors(err: pytest.ExceptionInfo[ConfigError]) -> None:
    msg = str(err.value)
    assert "2 added ('net.0.weight_orig', 'net.0.weight_mask')" in msg, msg
    assert "1 removed ('net.0.weight')" in msg, msg
    assert "fixed during fit" in msg and "ModelPruning" in msg, msg


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_a_model_whose_tensors_change_during_fit_stops_at_its_next_barrier(dtype, overlap):
    m, net, rounds = synced(dtype)
    prune.l1_unstructured(m.net[0], "weight", amount=0.5)  # what ModelPruning does at epoch end
    with pytest.raises(ConfigError) as err:
        rounds.hand_off(BarrierSync(round=1, samples=4), overlap=overlap)
    assert_names_the_pruned_tensors(err)
    assert rounds.in_flight is None and not net.pending  # nothing was built or handed off


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_tensors_that_change_while_a_round_travels_stop_its_apply(dtype):
    m, net, rounds = synced(dtype)
    rounds.hand_off(BarrierSync(round=1, samples=4), overlap=True)
    prune.l1_unstructured(m.net[0], "weight", amount=0.5)  # during the overlapped round
    net.answer()  # the upload was the copy taken at the barrier: it still has the old tensors
    with pytest.raises(ConfigError) as err:
        rounds.settle()
    assert_names_the_pruned_tensors(err)
