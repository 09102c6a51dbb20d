"""The session state machine, driven with a fake clock: decisions and their reasons."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import msgspec
import pytest

from lightning_drift.coordinator.boundary import CALIBRATION_MAX, PACE_FACTOR, TRAIN_S_MIN
from lightning_drift.coordinator.config import MEASURED_SMOOTHING, SessionConfig
from lightning_drift.coordinator.epochbook import consumed
from lightning_drift.coordinator.pacebook import NodePace, ema
from lightning_drift.coordinator.session import MemberState, Session, Verdict
from lightning_drift.protocol import NodeInfo, TrainProgress

A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def info(dataset_size: int = 1000, calibration: float = 100.0) -> NodeInfo:
    return NodeInfo(
        nonce="n",
        devices=[],
        train_device="cpu",
        cpu="test",
        cpu_count=1,
        memory=1 << 30,
        calibration=calibration,
        torch_version="2",
        dataset_size=dataset_size,
    )


def session(**kw) -> Session:
    cfg = dict(epochs=2, batch_size=10, sync_every=10, min_nodes=2, dataset_size=1000, quorum=0.5)
    cfg.update(kw)
    return Session(SessionConfig(**cfg), session_id="s1", now=0.0)


def ready(s: Session, node: str, now: float = 0.0, **kw) -> None:
    assert s.join(node, node[:1], now).ok
    d = s.admit(node, info(**kw), now)
    assert d.ok, d.reason


def start(
    s: Session, *nodes: str, now: float = 0.0, calibration: dict[str, float] | None = None
) -> None:
    """Nodes join, round 0 is synced, every node gets its epoch-0 shard."""
    for n in nodes:
        kw = {} if calibration is None or n not in calibration else {"calibration": calibration[n]}
        ready(s, n, now, dataset_size=s.config.dataset_size, **kw)
    v = s.upload(nodes[0], 0, now)
    assert v.kind is Verdict.INITIAL
    s.initial(now)
    for n in nodes:
        assert s.upload(n, 0, now).kind is Verdict.CURRENT
        r = s.shard(n, 0, now)
        assert r.assignment is not None, r.reason


def arrive(s: Session, node: str, now: float, samples: int = 100):
    open_round = s.open_round
    v = s.upload(node, open_round, now)
    assert v.kind is Verdict.OPEN, v.reason
    return s.arrived(node, open_round, samples, now)


def finish_round(s: Session, now: float):
    r = s.open_round
    s.close(r)
    return s.advance(r, now)


def test_join_admit_and_dataset_mismatch():
    s = session()
    assert s.join(A, "a", 0.0).reason == f"node {A[:8]} joined"
    d = s.admit(A, info(dataset_size=999), 0.0)
    assert not d.ok and d.code == "dataset_mismatch"
    assert "999" in d.reason and "1000" in d.reason
    assert s.admit(A, info(), 0.0).ok
    assert s.members[A].state is MemberState.READY


def test_dataset_size_adopted_from_first_node():
    s = session(dataset_size=0)
    ready(s, A, dataset_size=640)
    assert s.dataset_size == 640 and s.train_config().dataset_size == 640
    s.join(B, "b", 0.0)
    assert s.admit(B, info(dataset_size=641), 0.0).code == "dataset_mismatch"


def test_a_different_model_is_refused_with_both_fingerprints():
    s = session()
    s.join(A, "a", 0.0)
    assert s.admit(A, msgspec.structs.replace(info(), model_fingerprint="f" * 64), 0.0).ok
    s.join(B, "b", 0.0)
    d = s.admit(B, msgspec.structs.replace(info(), model_fingerprint="e" * 64), 0.0)
    assert not d.ok and d.code == "model_mismatch"
    assert "eeeeeeeeeeee" in d.reason and "ffffffffffff" in d.reason
    assert Session.from_dict(s.to_dict(), now=1.0).model_fingerprint == "f" * 64


def test_start_gate_waits_for_min_nodes():
    s = session(min_nodes=2)
    ready(s, A)
    s.upload(A, 0, 0.0)
    s.initial(0.0)
    r = s.shard(A, 0, 1.0)
    assert r.wait and "not planned yet" in r.reason
    assert "start gate" in s.check(1.0).reason
    ready(s, B, 2.0)
    r = s.shard(A, 0, 2.0)
    assert r.assignment is not None
    a, b = s.assignments[A], s.assignments[B]
    assert (a.start, a.stop, b.start, b.stop) == (0, 500, 500, 1000)
    assert a.first_round == 1 and a.rounds == 5  # 1000 / (10 * 10 * 2)


def test_round_zero_then_stale_uploads_answered_at_once():
    s = session(min_nodes=1)
    start(s, A)
    assert s.completed == 0 and s.has_weights
    v = s.upload(A, 0, 1.0)
    assert v.kind is Verdict.CURRENT and "global weights" in v.reason
    arrive(s, A, 1.0)
    finish_round(s, 2.0)
    v = s.upload(A, 1, 3.0)
    assert v.kind is Verdict.CURRENT and "round 1 already completed" in v.reason
    v = s.upload(A, 5, 3.0)
    assert v.kind is Verdict.REFUSE and v.code == "bad_round" and "open round is 2" in v.reason


def test_round_completes_when_all_live_nodes_arrive():
    s = session()
    start(s, A, B)
    d = arrive(s, A, 1.0)
    assert not d.complete
    # A's arrival is the coordinator's own measure of pace: B's is estimated from it.
    assert "1/2 arrived" in d.reason and "deadline in" in d.reason
    assert f"pace of {B[:8]} estimated from calibration" in d.reason
    d = arrive(s, B, 2.0)
    assert d.complete
    assert d.reason == f"round 1 complete: all 2 live node(s) arrived ({A[:8]}, {B[:8]})"
    assert d.contributors == ((A, 100), (B, 100))
    assert s.upload(A, 1, 2.0).kind is Verdict.AGAIN
    assert s.close(1) == ((A, 100), (B, 100))
    assert s.upload(C, 1, 2.0).kind is Verdict.REFUSE  # never joined
    assert s.upload(A, 1, 2.1).kind is Verdict.LATE
    out = s.advance(1, 3.0)
    assert out.completed_round == 1 and not out.finished and s.open_round == 2
    assert s.members[A].barrier_wait == pytest.approx(2.0)


def test_heartbeat_loss_mid_round_excludes_the_node():
    s = session(heartbeat_timeout=15.0, deadline_floor=30.0)  # the deadline is not the cause
    start(s, A, B, C, now=0.0)
    arrive(s, A, 5.0)
    arrive(s, B, 6.0)
    s.seen(A, 10.0)
    s.seen(B, 10.0)
    gone, d = s.tick(14.0)
    assert gone == [] and not d.complete
    gone, d = s.tick(15.5)
    assert [n for n, _ in gone] == [C]
    assert "no message for 15.5s (heartbeat timeout 15s)" in gone[0][1]
    assert s.members[C].state is MemberState.LOST
    assert d.complete and "all 2 live node(s) arrived" in d.reason
    assert C in s.book.orphans  # its shard's rest is handed to the next late joiner


def test_quorum_after_adaptive_deadline():
    s = session(min_nodes=3, quorum=0.5, deadline_floor=10.0, deadline_margin=1.5)
    start(s, A, B, C, now=0.0)
    for n in (A, B, C):
        s.progress(n, TrainProgress(round=1, epoch=0, step=1, samples=10, samples_per_s=5.0), 1.0)
    # Each shard is 333-334 samples over 3 rounds (1000/(10*10*3) -> 3), ~111 per round; A
    # and B are measured at ~5 samples/s, and C's calibration is theirs: ~22 s a round at
    # its estimated pace, 1.5 x that ~33 s. But a quorum arrived (2 of 3) within 21 s: the
    # deadline is a margin over what they took, 1.5 x 21 = 31.5 s, whatever C's pace says.
    arrive(s, A, 20.0)
    arrive(s, B, 21.0)
    dl = s.deadline()
    c = s.assignments[C]
    by_pace = 1.5 * ((c.stop - c.start) / 3) / s.paces.for_deadline([C], s.scheduler)[C].pace
    assert by_pace > 32.0 and dl == pytest.approx(1.5 * 21.0)
    s.seen(C, 30.0)  # alive but slow
    d = s.check(30.0)
    assert not d.complete and "deadline in" in d.reason and f"missing {C[:8]}" in d.reason
    d = s.check(34.0)
    assert d.complete
    assert "deadline passed" in d.reason and "quorum 2/3 (needed 2)" in d.reason
    assert d.missing == (C,) and [n for n, _ in d.contributors] == [A, B]


def test_deadline_has_a_floor():
    s = session(min_nodes=2, deadline_floor=10.0)
    start(s, A, B)
    for n in (A, B):
        s.progress(n, TrainProgress(round=1, epoch=0, step=1, samples=1, samples_per_s=1e6), 0.0)
    arrive(s, A, 1.0)
    assert s.deadline() == pytest.approx(10.0)
    s.seen(B, 9.0)
    assert not s.check(9.0).complete
    assert s.check(10.5).complete


def test_a_node_that_never_reports_a_rate_gets_a_deadline_from_its_calibration():
    s = session(min_nodes=3, quorum=0.5, deadline_floor=10.0, deadline_margin=1.5)
    start(s, A, B, C, calibration={A: 100.0, B: 100.0, C: 50.0})
    d = s.check(1.0)  # nothing measured yet: calibration is not in samples/s
    assert not d.complete and "0/3 arrived" in d.reason and s.deadline() is None
    for n in (A, B):
        s.progress(n, TrainProgress(round=1, epoch=0, step=1, samples=10, samples_per_s=5.0), 2.0)
    # A and B arrive with 100 samples 20 s into the round: the coordinator measures 5 samples/s.
    arrive(s, A, 20.0)
    arrive(s, B, 20.0)
    assert s.paces.of(A).measured == pytest.approx(5.0)
    # C heartbeats but never reports a rate. Its estimate: 50 GFLOP/s x (10 / 200) samples per
    # GFLOP = 2.5 samples/s, for a third of its 200-sample shard per round.
    c = s.assignments[C]
    assert c.stop - c.start == 200 and c.rounds == 3
    estimate = s.paces.for_deadline([C], s.scheduler)[C]
    assert estimate.estimated and estimate.pace == pytest.approx(2.5)
    # 1.5 x (200 / 3) / 2.5 = 40 s by C's estimate; the quorum (A, B) took 20 s: 1.5 x 20.
    dl = min(1.5 * (200 / 3) / 2.5, 1.5 * 20.0)
    assert s.deadline() == pytest.approx(dl) == 30.0
    t = 20.0
    while t < dl - 1.0:  # every node keeps pinging: no heartbeat loss
        t = min(t + 5.0, dl - 0.5)
        for n in (A, B, C):
            s.seen(n, t)
        gone, d = s.tick(t)
        assert gone == [] and not d.complete, d.reason
    assert "deadline in" in d.reason and f"pace of {C[:8]} estimated from calibration" in d.reason
    for n in (A, B, C):
        s.seen(n, dl)
    gone, d = s.tick(dl + 0.5)
    assert gone == [] and d.complete
    assert "deadline passed" in d.reason and "quorum 2/3 (needed 2)" in d.reason
    assert f"pace of {C[:8]} estimated from calibration, no measured rate" in d.reason
    assert d.missing == (C,) and [n for n, _ in d.contributors] == [A, B]


def test_restore_gives_a_reconnect_grace_before_the_round_clock_starts():
    s = session(min_nodes=3, heartbeat_timeout=15.0, deadline_floor=10.0, quorum=0.5)
    start(s, A, B, C)
    for n in (A, B, C):
        s.progress(n, TrainProgress(round=1, epoch=0, step=1, samples=1, samples_per_s=1e6), 0.0)
    for n in (A, B, C):
        arrive(s, n, 1.0)
    finish_round(s, 1.0)
    r = Session.from_dict(json.loads(json.dumps(s.to_dict())), now=100.0)
    assert r.open_round == 2
    arrive(r, A, 101.0)  # re-sent after noticing the restart
    arrive(r, B, 102.0)
    # Fast measured rates: the deadline is the floor, counted after the 15 s grace.
    assert r.deadline() == pytest.approx(100.0 + 15.0 + 10.0)
    gone, d = r.tick(110.0)  # restore + floor: C may still be reconnecting
    assert gone == [] and not d.complete
    assert "deadline in 15.0s" in d.reason and "15s reconnect grace for the restart" in d.reason
    for n in (A, B, C):
        r.seen(n, 120.0)
    assert not r.tick(124.5)[1].complete
    gone, d = r.tick(125.5)
    assert gone == [] and d.complete and d.missing == (C,)
    assert "deadline passed 0.5s ago" in d.reason and "reconnect grace" in d.reason
    finish_round(r, 126.0)
    arrive(r, A, 127.0)
    assert "reconnect grace" not in r.check(127.0).reason  # later rounds start at once
    assert r.deadline() == pytest.approx(136.0)


def test_upload_weight_is_bounded_by_the_shard():
    s = session(min_nodes=2)
    start(s, A, B)
    a = s.assignments[A]
    assert a.stop - a.start == 500
    assert s.weight_for(A, 120) == 120.0
    assert s.weight_for(A, 500) == 500.0
    assert s.weight_for(A, 10**12) == 500.0  # at most its whole shard
    assert s.weight_for(A, -5) == 0.0
    assert s.weight_for(C, 10**12) == 1000.0  # no assignment: the dataset bounds it
    open_round = s.open_round
    assert s.upload(A, open_round, 1.0).kind is Verdict.OPEN
    d = s.arrived(A, open_round, 10**12, 1.0, train_s=10.0)
    # One round's upload holds at most one round of its work (5 rounds of 100) and a step.
    assert a.rounds == 5 and s.weight_for(A, 10**12, open_round) == 110.0
    assert s.arrivals[A] == 110 and s.members[A].samples == 110
    # 110 samples in 10 s is 11/s, held within PACE_FACTOR of the 100/s measured; not 1e11.
    assert s.paces.of(A).reported == pytest.approx(100.0 / PACE_FACTOR)
    d = arrive(s, B, 2.0, samples=100)
    assert d.complete and d.contributors == ((A, 110), (B, 100))
    # Two rounds after its last counted upload, a node may hold two rounds of work.
    assert s.weight_for(A, 10**12, open_round + 2) == 210.0


def test_below_quorum_keeps_waiting_with_reason():
    s = session(min_nodes=4, quorum=0.75, deadline_floor=1.0)
    start(s, A, B, C, D)
    for n in (A, B, C, D):
        s.progress(n, TrainProgress(round=1, epoch=0, step=1, samples=1, samples_per_s=1e6), 0.0)
    arrive(s, A, 1.0)
    arrive(s, B, 1.0)
    for n in (C, D):
        s.seen(n, 5.0)
    d = s.check(5.0)
    assert not d.complete
    assert "deadline passed but only 2/4 arrived, quorum needs 3" in d.reason
    assert "waiting until the hard deadline" in d.reason


def test_bad_upload_excluded_round_does_not_wait():
    s = session()
    start(s, A, B)
    arrive(s, A, 1.0)
    assert s.upload(B, 1, 2.0).kind is Verdict.OPEN
    d = s.reject(B, 1, "tensor w has NaN", 2.0)
    assert d.complete and d.contributors == ((A, 100),)
    assert "all 1 live node(s) arrived" in d.reason
    v = s.upload(B, 1, 2.5)
    assert v.kind is Verdict.LATE and "excluded from round 1: tensor w has NaN" in v.reason
    finish_round(s, 3.0)
    assert s.expected() == [A, B]  # excluded for that round only


def test_a_delta_against_other_weights_is_excluded_and_the_round_does_not_wait():
    s = session()
    start(s, A, B)
    arrive(s, A, 1.0)
    assert s.upload(B, 1, 1.5, base_round=0, delta=True).kind is Verdict.OPEN  # round 0's: fine
    assert s.upload(B, 1, 1.5, base_round=7).kind is Verdict.OPEN  # whole weights: any base
    v = s.upload(B, 1, 2.0, base_round=7, delta=True)
    assert v.kind is Verdict.LEFT_OUT and not v.kind.contributed and not v.kind.at_once
    assert v.reason == (
        "delta against round 7's weights, but the global weights are round 0's: left out of round 1"
    )
    d = s.check(2.0)
    assert d.complete and d.contributors == ((A, 100),)
    assert s.upload(B, 1, 2.5).kind is Verdict.LATE  # asked again: still left out


def test_a_delta_that_does_not_name_its_base_is_refused():
    s = session()
    start(s, A, B)
    v = s.upload(B, 1, 1.0, delta=True)
    assert v.kind is Verdict.REFUSE and v.code == "bad_upload"
    assert "must name the round of the weights it was taken against" in v.reason
    assert B not in s.arrivals and B not in s.round.left_out  # nothing was recorded
    assert s.expected() == [A, B]


def test_verdicts_say_how_they_are_answered():
    answered_now = {v for v in Verdict if v.at_once}
    assert answered_now == {Verdict.INITIAL, Verdict.CURRENT}
    assert {v for v in Verdict if v.contributed} == {Verdict.INITIAL, Verdict.OPEN, Verdict.AGAIN}


def test_late_joiner_counts_only_if_in_time_and_is_expected_from_its_second_round():
    s = session(min_nodes=2, epochs=1)
    start(s, A, B)
    ready(s, C, 1.0)
    assert s.upload(C, 0, 1.0).kind is Verdict.CURRENT  # gets the current global weights
    r = s.shard(C, 0, 1.0)
    assert r.assignment is not None and "late joiner" in r.reason
    assert r.assignment.first_round == 1 and r.assignment.rounds == 5
    assert s.expected() == [A, B]
    arrive(s, A, 2.0)
    arrive(s, C, 2.5)  # in time: counts
    d = arrive(s, B, 3.0)
    assert d.complete and [n for n, _ in d.contributors] == [A, C, B]
    finish_round(s, 4.0)
    assert s.expected() == [A, B, C]


def test_late_joiner_too_late_is_not_counted():
    s = session(min_nodes=2, epochs=1)
    start(s, A, B)
    ready(s, C, 1.0)
    s.shard(C, 0, 1.0)
    arrive(s, A, 2.0)
    d = arrive(s, B, 2.0)
    assert d.complete
    s.close(1)
    assert s.upload(C, 1, 2.5).kind is Verdict.LATE
    s.advance(1, 3.0)
    assert s.upload(C, 1, 3.5).kind is Verdict.CURRENT


def test_rejoin_same_key_gets_rest_of_its_shard():
    s = session(min_nodes=2, epochs=1, heartbeat_timeout=5.0)
    start(s, A, B)
    for _ in range(2):
        arrive(s, A, 1.0)
        arrive(s, B, 1.0)
        finish_round(s, 1.0)
    a_b = s.assignments[B]
    s.lost(B, "connection closed", 2.0)
    assert s.members[B].state is MemberState.LOST
    # B had done 2 of 5 rounds of a 500-sample shard: 50 steps → barrier 2 after 20 steps.
    assert s.book.orphans[B].start == a_b.start + 200
    arrive(s, A, 3.0)
    assert s.check(3.0).complete  # B is not waited for
    finish_round(s, 3.0)
    d = s.join(B, "b", 4.0)
    assert d.ok and d.reason == f"node {B[:8]} rejoined (was lost)"
    assert s.admit(B, info(), 4.0).ok
    r = s.shard(B, 0, 4.0)
    a = r.assignment
    assert a is not None and "late joiner" in r.reason
    assert (a.start, a.stop, a.first_round, a.rounds) == (700, 1000, 4, 2)
    assert s.expected() == [A]  # its first round after rejoining does not wait for it


def test_epoch_rollover_and_finish():
    s = session(min_nodes=1, epochs=2, dataset_size=200)
    start(s, A)
    plan = s.plan
    assert plan is not None and plan.rounds == 2
    arrive(s, A, 1.0)
    out = finish_round(s, 1.0)
    assert not out.finished and out.planned_epoch is None
    arrive(s, A, 2.0)
    out = finish_round(s, 2.0)
    assert out.planned_epoch == 1 and "planned epoch 1" in out.reason
    assert s.shard(A, 1, 2.0).assignment.first_round == 3
    arrive(s, A, 3.0)
    finish_round(s, 3.0)
    arrive(s, A, 4.0)
    out = finish_round(s, 4.0)
    assert out.finished and "finished" in out.reason
    assert s.upload(A, 5, 5.0).kind is Verdict.CURRENT
    late = s.join(B, "b", 5.0)
    assert late.ok and "final weights" in late.reason
    assert s.status(5.0).state == "finished"


def test_persistence_round_trip_keeps_members_expected():
    s = session(heartbeat_timeout=15.0)
    start(s, A, B)
    arrive(s, A, 1.0)
    arrive(s, B, 1.0)
    finish_round(s, 1.0)
    d = json.loads(json.dumps(s.to_dict()))
    r = Session.from_dict(d, now=100.0)
    assert r.completed == 1 and r.open_round == 2 and r.has_weights
    assert r.expected() == [A, B]  # restored members get a grace period to reconnect
    assert r.assignments == s.assignments
    assert r.scheduler.to_dict() == s.scheduler.to_dict()
    gone, _ = r.tick(116.0)
    assert gone == []  # grace: 2 x heartbeat timeout from the restart
    gone, _ = r.tick(131.0)
    assert {n for n, _ in gone} == {A, B}


def test_returning_node_resending_its_upload_gets_a_late_shard():
    s = session(min_nodes=2, epochs=1)
    start(s, A, B)
    s.lost(B, "connection closed", 1.0)
    assert s.join(B, "b", 2.0).ok and s.admit(B, info(), 2.0).ok
    v = s.upload(B, 1, 2.0)  # no ShardRequest first: it re-sends what it held
    assert v.kind is Verdict.OPEN and "returning node" in v.reason
    a = s.assignments[B]
    assert a.first_round == 1 and B in s.book.late and (a.start, a.stop) == (500, 1000)


def test_status_view():
    s = session()
    start(s, A, B)
    s.progress(A, TrainProgress(round=1, epoch=0, step=3, samples=30, samples_per_s=12.5), 1.0)
    st = s.status(1.0)
    assert st.state == "training" and st.round == 0 and len(st.nodes) == 2
    na = next(n for n in st.nodes if n.node_id == A)
    assert na.samples_per_s == 12.5 and na.share == pytest.approx(0.5) and na.state == "training"


def test_train_config_carries_every_setting_the_nodes_need():
    s = session(aggregation="diloco", outer_lr=0.5, transfer_dtype="bfloat16", seed=7)
    tc = s.train_config()
    sent = {f.name for f in msgspec.structs.fields(tc)}
    for name, value in asdict(s.config).items():
        if name in sent:
            assert getattr(tc, name) == value, name
    assert {"aggregation", "outer_lr", "transfer_dtype", "seed", "epochs"} <= sent
    assert (tc.round, tc.has_weights, tc.session_id) == (s.completed, False, "s1")


# -- stopping early -------------------------------------------------------------------------


def test_a_node_at_its_max_steps_under_first_ends_the_session():
    """Under ``first`` the session follows any one node: its max_steps too."""
    s = session(stop_policy="first")
    start(s, A, B)
    v = s.request_stop(A, "max_steps", "reached Trainer(max_steps=5)", 1.0)
    assert v.stop and v.newly and not v.leave and v.final_round == 1 == s.stop_round
    assert f"node {A[:8]} reached its max_steps" in v.reason and "stop policy first" in v.reason


@pytest.mark.parametrize("policy", ["quorum", "never"])
def test_a_node_at_its_max_steps_leaves_its_work_is_handed_on_and_the_others_train_on(policy):
    s = session(stop_policy=policy, min_nodes=3)
    start(s, A, B, C)
    for n in (A, B, C):
        arrive(s, n, 1.0)
    finish_round(s, 1.5)
    v = s.request_stop(A, "max_steps", "reached Trainer(max_steps=12)", 2.0)
    assert not v.stop and v.leave and not v.newly
    assert not s.finished and s.stop_round is None and s.stop_reason == ""
    assert f"node {A[:8]} reached its max_steps (reached Trainer(max_steps=12))" in v.reason
    assert f"stop policy {policy}" in v.reason and "the session trains on" in v.reason
    # Its last steps count in the open round; it gets that round's weights and says goodbye.
    arrive(s, A, 2.5, samples=40)
    arrive(s, B, 3.0)
    arrive(s, C, 3.0)
    assert not finish_round(s, 3.5).finished
    assert s.lost(A, "bye: reached Trainer(max_steps=12)", 4.0, left=True).ok
    assert s.members[A].state is MemberState.LEFT and A not in s.stop_requests
    assert A in s.book.orphans and A not in s.assignments  # the rest of its work is handed on
    # The others train on: the open round waits for them alone, and completes with them.
    assert s.expected() == [B, C]
    arrive(s, B, 5.0)
    assert arrive(s, C, 5.0).complete
    outcome = finish_round(s, 5.5)
    assert not outcome.finished and outcome.stop is None and s.stop_round is None
    # The next node to come in gets the orphaned rest.
    ready(s, D, 6.0)
    assert s.shard(D, 0, 6.0).assignment is not None and A not in s.book.orphans


def test_a_node_told_to_leave_cannot_stop_the_session_on_its_way_out():
    """Its request was counted when it was made; its last upload then makes it weigh more,
    but the round that upload completes does not count the request again."""
    s = session(stop_policy="quorum", stop_quorum=0.5)
    start(s, A, B)
    arrive(s, B, 1.0, samples=20)
    v = s.request_stop(A, "max_steps", "reached Trainer(max_steps=3)", 1.5)
    assert not v.stop and v.leave and "having delivered 0 of the live nodes' 20 samples" in v.reason
    arrive(s, A, 2.0, samples=100)  # its last steps: now it holds most of the work
    outcome = finish_round(s, 2.5)
    assert outcome.stop is None and s.stop_round is None and not s.finished


def test_stop_votes_weigh_delivered_work_not_keys():
    """Extra keys under one token, all asking, delivered nothing and weigh nothing; the node
    that delivered half the work reaches the quorum alone."""
    s = session(stop_policy="quorum", stop_quorum=0.5)
    start(s, A, B)
    arrive(s, A, 1.0)
    arrive(s, B, 1.0)
    finish_round(s, 1.5)
    sybils = [f"{i:02x}" * 32 for i in range(8)]
    for key in sybils:
        ready(s, key, 2.0)
        v = s.request_stop(key, "callback", "stop", 2.0)
        assert not v.stop and f"node {key[:8]} asked to stop (stop)" in v.reason
    v = s.request_stop(sybils[0], "max_steps", "", 2.1)
    assert not v.stop and v.leave
    assert "8 of 10 node(s) asked, having delivered 0 of the live nodes' 200 samples" in v.reason
    assert s.stop_round is None and sybils[0] not in s.stop_requests  # it leaves with its node
    v = s.request_stop(B, "callback", "EarlyStopping", 2.2)
    assert v.stop and v.newly and v.final_round == 2 == s.stop_round
    assert "8 of 10 node(s) asked, having delivered 100 of" in v.reason and "needs 100" in v.reason


def test_a_request_made_before_any_work_counts_once_its_voters_have_delivered():
    s = session(stop_policy="quorum", stop_quorum=0.5)
    start(s, A, B)
    v = s.request_stop(A, "callback", "EarlyStopping", 0.5)
    assert not v.stop and "no live node has delivered any work yet" in v.reason
    arrive(s, A, 1.0)
    arrive(s, B, 1.0)
    outcome = finish_round(s, 1.5)  # the round's arrivals count: A's request now weighs half
    assert outcome.stop is not None and outcome.stop.newly and outcome.stop.final_round == 2
    assert s.stop_round == 2 and not s.finished
    assert f"the stop requests standing (node(s) {A[:8]}) now count" in outcome.reason
    assert outcome.reason.endswith("round 2 is the final round")
    arrive(s, A, 2.0)
    arrive(s, B, 2.0)
    assert finish_round(s, 2.5).finished


def test_standing_requests_that_count_at_an_epoch_end_finish_the_session_there():
    s = session(epochs=3, stop_policy="quorum", dataset_size=100, batch_size=10, sync_every=100)
    start(s, A, B)
    s.request_stop(A, "callback", "", 0.5)
    arrive(s, A, 1.0)
    arrive(s, B, 1.0)
    outcome = finish_round(s, 1.5)  # the epoch's only round
    assert outcome.finished and outcome.planned_epoch is None and s.plan.epoch == 0
    assert outcome.stop is not None and outcome.stop.finished_now and s.stop_round == 1


def test_an_overruled_request_counts_later_and_the_open_round_becomes_the_final_one():
    s = session(stop_policy="quorum", stop_quorum=1.0)
    start(s, A, B)
    v = s.request_stop(A, "callback", "EarlyStopping", 1.0)
    assert not v.stop and "session continues: 1 of 2 node(s) asked" in v.reason
    assert s.stop_round is None and s.status(1.0).nodes[0].stop_asked
    arrive(s, A, 2.0)
    v = s.request_stop(B, "callback", "EarlyStopping", 2.5)
    assert v.stop and v.newly and v.final_round == 1 == s.stop_round
    assert "2 of 2 node(s) asked" in v.reason and "round 1 is the final round" in v.reason
    # Asking again (or a late node asking) gets the same decision, not a new one.
    again = s.request_stop(A, "callback", "", 2.6)
    assert again.stop and not again.newly and again.final_round == 1
    assert s.train_config().stop_round == 1  # a node that reconnects is told
    arrive(s, B, 3.0, samples=0)
    assert s.check(3.0).complete
    outcome = finish_round(s, 3.5)
    assert outcome.finished and s.finished and "was the final round" in outcome.reason
    assert s.maybe_plan(4.0) is None  # no next epoch after a stop
    assert s.status(4.0).stop_reason.startswith(f"node {B[:8]} asked to stop")


def test_a_stop_between_epochs_finishes_on_the_last_completed_round():
    s = session(epochs=3, stop_policy="first", dataset_size=100, batch_size=10, sync_every=100)
    start(s, A, B)
    arrive(s, A, 1.0)
    arrive(s, B, 1.0)
    assert finish_round(s, 1.5).planned_epoch == 1
    s.plan = None  # as if the next epoch were still waiting for its gate
    v = s.request_stop(A, "callback", "", 2.0)
    assert v.stop and v.finished_now and v.final_round == 1 == s.completed and s.finished


def test_the_stop_survives_a_restart():
    s = session(stop_policy="first")
    start(s, A, B)
    s.request_stop(A, "max_steps", "reached Trainer(max_steps=5)", 1.0)
    restored = Session.from_dict(json.loads(json.dumps(s.to_dict())), now=2.0)
    assert restored.stop_round == s.stop_round == 1
    assert "max_steps" in restored.stop_reason
    assert restored.stop_requests == {A: "reached Trainer(max_steps=5)"}


def test_progress_reports_loss_and_vram_into_the_status():
    s = session()
    start(s, A, B)
    s.progress(
        A,
        TrainProgress(round=1, epoch=0, step=1, samples=1, loss=2.5, vram_used=3 << 30,
                      vram_peak=5 << 30),
        1.0,
    )  # fmt: skip
    s.progress(A, TrainProgress(round=1, epoch=0, step=2, samples=2, vram_used=1 << 30), 2.0)
    n = next(n for n in s.status(2.0).nodes if n.node_id == A)
    assert (n.vram_used, n.vram_peak) == (1 << 30, 5 << 30)  # the peak is kept


# ---- what a node says about itself is bounded -----------------------------------------------


def test_live_members_are_capped_per_token_and_per_session():
    s = session(max_nodes=3, max_nodes_per_token=2)
    assert s.join(A, "a", 0.0, token="t1").ok and s.join(B, "b", 0.0, token="t1").ok
    d = s.join(C, "c", 0.0, token="t1")
    assert not d.ok and d.code == "too_many_nodes" and "token t1 already has 2" in d.reason
    assert s.join(C, "c", 0.0, token="t2").ok
    d = s.join(D, "d", 0.0, token="t3")
    assert not d.ok and d.code == "too_many_nodes" and "maximum of 3 live nodes" in d.reason
    assert s.join(A, "a", 1.0, token="t1").ok  # a member reconnecting is not counted twice
    s.lost(A, "bye", 2.0, left=True)
    assert s.join(D, "d", 3.0, token="t3").ok  # a place is free again


def test_names_are_made_unique_for_display():
    s = session()
    assert s.join(A, "box", 0.0).ok and s.join(B, "box", 0.0).ok and s.join(C, "box", 0.0).ok
    assert [s.members[n].name for n in (A, B, C)] == ["box", "box#2", "box#3"]
    s.join(A, "box", 1.0)
    assert s.members[A].name == "box"  # its own name is not taken from it


def test_members_gone_long_ago_are_forgotten():
    s = session(forget_after_s=60.0, heartbeat_timeout=1000.0)
    start(s, A, B)
    s.lost(B, "connection closed", 10.0)
    assert s.forget(69.0) == [] and B in s.members
    gone, _ = s.tick(71.0)
    assert B not in s.members and B not in s.admitted and B not in s.scheduler
    assert [n.node_id for n in s.status(71.0).nodes] == [A]
    assert s.join(B, "b", 72.0).reason == f"node {B[:8]} joined"  # a new member now


def test_gone_members_beyond_the_cap_are_forgotten_oldest_first():
    s = session(max_nodes=2, forget_after_s=1e6)
    for i in range(5):
        node = f"{i:02x}" * 32
        assert s.join(node, "", float(i)).ok
        s.lost(node, "gone", float(i), left=True)
    s.forget(10.0)
    assert sorted(s.members) == ["03" * 32, "04" * 32]


def test_a_node_whose_uploads_keep_failing_is_excluded_for_good():
    s = session(max_strikes=2)
    start(s, A, B)
    d = s.strike(B, "NaN in w", 1.0)
    assert not d.ok and "failed upload 1/2" in d.reason
    d = s.strike(B, "NaN in w", 2.0)
    assert d.ok and d.code == "excluded" and "2 failed uploads, the last: NaN in w" in d.reason
    assert s.members[B].state is MemberState.BANNED and s.expected() == [A]
    assert s.upload(B, 1, 2.0).kind is Verdict.REFUSE
    refused = s.join(B, "b", 3.0)
    assert not refused.ok and refused.code == "excluded"
    r = Session.from_dict(json.loads(json.dumps(s.to_dict())), now=10.0)
    assert not r.join(B, "b", 11.0).ok  # survives a restart
    assert r.members[B].state is MemberState.BANNED


def test_a_tiny_reported_rate_cannot_stretch_the_deadline():
    s = session(min_nodes=2, deadline_floor=1.0, deadline_margin=1.5)
    start(s, A, B)
    s.progress(B, TrainProgress(round=1, epoch=0, step=0, samples=0, samples_per_s=1e-3), 0.0)
    arrive(s, A, 10.0)  # the coordinator measures 100 samples in 10 s: 10 samples/s
    assert s.paces.of(A).measured == pytest.approx(10.0)
    s.progress(B, TrainProgress(round=1, epoch=0, step=0, samples=0, samples_per_s=1e-3), 10.0)
    # What B says is never read for a deadline: its pace is its calibration's estimate (A's,
    # the same machine), and A, a quorum, took 10 s: 1.5 x 10 s either way.
    assert s.deadline() == pytest.approx(15.0)
    assert s.paces.of(B).reported == pytest.approx(10.0 / PACE_FACTOR)  # what status shows


def test_a_huge_calibration_gets_a_bounded_share():
    s = session(min_nodes=3)
    start(s, A, B, C, calibration={A: 10.0, B: 10.0, C: CALIBRATION_MAX})
    shares = {n: a.share for n, a in s.assignments.items()}
    assert shares[C] == pytest.approx(PACE_FACTOR / (PACE_FACTOR + 2))


def test_a_self_reported_rate_is_bounded_by_the_measured_one():
    s = session(min_nodes=2)
    start(s, A, B)
    open_round = s.open_round
    assert s.upload(A, open_round, 4.0).kind is Verdict.OPEN
    s.arrived(A, open_round, 100, 4.0, train_s=TRAIN_S_MIN)  # claims 10^5 samples/s
    p = s.paces.of(A)
    assert p.measured == pytest.approx(25.0) and p.reported == pytest.approx(25.0 * PACE_FACTOR)
    assert s.scheduler.pace(A, s.paces.measured()) == pytest.approx(
        25.0
    )  # plans use what was measured
    assert all(math.isfinite(n.samples_per_s) for n in s.status(5.0).nodes)


def _covered(s: Session) -> list[int]:
    return sorted(i for a in s.assignments.values() for lo, hi in a.ranges for i in range(lo, hi))


def _measured(s: Session, rates: dict[str, float], trained: dict[str, int], now: float) -> None:
    """Each node's pace measured at ``rates`` (as if from its uploads: reports move no work)
    and its position reported at ``trained``."""
    for node, rate in rates.items():
        s.paces.nodes.setdefault(node, NodePace()).measured = rate
        msg = TrainProgress(
            round=s.open_round,
            epoch=s.epoch,
            step=1,
            samples=trained[node],
            samples_per_s=rate,
            epoch_samples=trained[node],
        )
        s.progress(node, msg, now)


def test_a_re_plan_follows_measured_rates_once_per_round_and_keeps_the_epoch_covered():
    s = session(epochs=1, sync_every=5)  # 1000 samples, batch 10: 10 rounds, 500 each
    start(s, A, B)
    assert s.rebalance(0.5) == [] and "no measured rate yet" in s.last_rebalance
    _measured(s, {A: 30.0, B: 10.0}, {A: 40, B: 20}, 1.0)  # A is 3x as fast as planned
    out = s.rebalance(1.0)
    assert {n for n, _ in out} == {A, B}
    assert "apart at measured rates; moved" in s.last_rebalance
    new = dict(out)
    assert new[A].revision == new[B].revision == s.replans.revision == 1
    assert s.assignments[A] is new[A] and new[A].size > 500 > new[B].size
    assert new[A].ranges[0] == (0, 500) and new[B].ranges[0][0] == 500  # trained prefix kept
    assert _covered(s) == list(range(1000))  # every position with exactly one node
    assert new[A].share == pytest.approx(0.75)
    # At most one re-plan per open round, whatever comes in meanwhile.
    _measured(s, {A: 30.0, B: 10.0}, {A: 80, B: 30}, 2.0)
    assert s.rebalance(2.0) == [] and s.replans.round == s.open_round
    # The next round may re-plan again (here the plan already matches: nothing moves).
    arrive(s, A, 3.0, samples=100)
    arrive(s, B, 3.0, samples=40)
    finish_round(s, 3.0)
    _measured(s, {A: 30.0, B: 10.0}, {A: 140, B: 60}, 4.0)
    assert s.rebalance(4.0) == []
    assert s.paces.for_replan(A) == s.paces.of(A).measured  # what was measured, not said


def test_no_re_plan_when_switched_off_finished_or_at_the_epochs_end():
    s = session(epochs=1, sync_every=5, rebalance=False)
    start(s, A, B)
    _measured(s, {A: 30.0, B: 10.0}, {A: 0, B: 0}, 1.0)
    assert s.rebalance(1.0) == []
    s = session(epochs=1, sync_every=5)
    start(s, A, B)
    _measured(s, {A: 30.0, B: 10.0}, {A: 500, B: 490}, 1.0)  # all but done: nothing to move
    assert s.rebalance(1.0) == [] and "nothing can move" in s.last_rebalance
    s.finished = True
    assert s.rebalance(2.0) == []


def test_a_late_joiner_keeps_its_work_in_a_re_plan():
    s = session(epochs=1, sync_every=2, min_nodes=2)  # 25 rounds
    start(s, A, B)
    ready(s, C, 1.0)
    assert s.shard(C, 0, 1.0).assignment is not None and C in s.book.late
    c_before = s.assignments[C]
    _measured(s, {A: 30.0, B: 10.0, C: 1.0}, {A: 10, B: 10, C: 0}, 2.0)
    out = dict(s.rebalance(2.0))
    assert set(out) == {A, B} and s.assignments[C] == c_before


def test_a_node_lost_after_a_re_plan_hands_on_the_rest_after_its_last_counted_upload():
    s = session(epochs=1, sync_every=5, heartbeat_timeout=5.0)
    start(s, A, B)
    _measured(s, {A: 30.0, B: 10.0}, {A: 40, B: 20}, 1.0)
    s.rebalance(1.0)
    b = s.assignments[B]
    for node, samples in ((A, 120), (B, 40)):
        assert s.upload(node, 1, 2.0).kind is Verdict.OPEN
        s.arrived(node, 1, samples, 2.0, 4.0, epoch=0, epoch_samples=samples)
    finish_round(s, 2.0)
    s.progress(B, TrainProgress(round=2, epoch=0, step=9, samples=30, epoch_samples=70), 2.5)
    s.lost(B, "connection closed", 3.0)
    # Trained past its upload (70 > 40), but only what the upload held is in the weights:
    # what it said (40), at most the work of the one round it delivered.
    held = min(40, consumed(b, 1, 10))
    assert held < 40  # its claim is more than round 1 of its re-planned work holds
    orphan = s.book.orphans[B]
    assert orphan.ranges == ((b.ranges[0][0] + held, b.ranges[-1][1]),)
    assert B not in s.book.trained and B not in s.book.counted
    assert s.weight_for(A, 10_000) == s.assignments[A].size  # the cap is the re-planned size


def test_a_re_plan_survives_a_restart():
    s = session(epochs=1, sync_every=5)
    start(s, A, B)
    _measured(s, {A: 30.0, B: 10.0}, {A: 40, B: 20}, 1.0)
    s.rebalance(1.0)
    r = Session.from_dict(json.loads(json.dumps(s.to_dict())), now=10.0)
    assert r.assignments == s.assignments and r.assignments[A].segments
    assert (r.replans.revision, r.replans.round, r.book.trained) == (
        1,
        s.open_round,
        {A: 40, B: 20},
    )
    assert _covered(r) == list(range(1000))


def test_a_re_plan_moves_each_nodes_last_report_on_by_its_speed():
    # Equal speeds and equal reports, but A's report is 30 s older: by now A is 300 samples
    # further than it said, so B is the one behind and gives work to A (without moving the old
    # report on, the two would look balanced). Two rounds, so that the rounds let A be there.
    s = session(epochs=1, sync_every=25)  # 2 rounds
    start(s, A, B)
    _measured(s, {A: 10.0, B: 10.0}, {A: 0, B: 0}, 0.0)
    s.progress(
        A,
        TrainProgress(round=1, epoch=0, step=1, samples=50, samples_per_s=10.0, epoch_samples=50),
        0.0,
    )
    s.progress(
        B,
        TrainProgress(round=1, epoch=0, step=1, samples=50, samples_per_s=10.0, epoch_samples=50),
        30.0,
    )
    out = dict(s.rebalance(30.0))
    assert out[A].size > 500 > out[B].size, s.last_rebalance
    assert "bbbbbbbb -" in s.last_rebalance


def test_a_re_plan_moves_whole_optimizer_steps_of_every_node():
    """Nodes of 24 and 32 samples per optimizer step (batch × accumulation): work moves in
    multiples of 96, so both shards stay whole steps (no short last batch appears)."""
    s = session(epochs=1, sync_every=2, dataset_size=4800, batch_size=8)
    for node, sps in ((A, 24), (B, 32)):
        assert s.join(node, node[:1], 0.0).ok
        i = info(dataset_size=4800)
        i.batch_size, i.samples_per_step = 8, sps
        assert s.admit(node, i, 0.0).ok
    assert s.upload(A, 0, 0.0).kind is Verdict.INITIAL
    s.initial(0.0)
    for n in (A, B):
        s.upload(n, 0, 0.0)
        assert s.shard(n, 0, 0.0).assignment is not None
    before = {n: s.assignments[n].size for n in (A, B)}
    assert before[A] % 24 == 0 and before[B] % 32 == 0, before
    _measured(s, {A: 30.0, B: 10.0}, {A: 48, B: 32}, 1.0)
    out = dict(s.rebalance(1.0))
    assert out, s.last_rebalance
    moved = before[A] - s.assignments[A].size
    assert moved != 0 and moved % 96 == 0, (before, moved)
    assert s.assignments[A].size % 24 == 0 and s.assignments[B].size % 32 == 0
    assert _covered(s) == list(range(4800))


def test_re_plans_go_by_measured_paces_never_by_what_a_node_says():
    """A node saying it trains a million samples a second moves no work: re-plans go by the
    paces measured from uploads; the status still shows what it said."""
    s = session(epochs=1, sync_every=5)
    start(s, A, B)
    _measured(s, {A: 30.0, B: 30.0}, {A: 10, B: 10}, 1.0)
    s.progress(A, TrainProgress(round=1, epoch=0, step=2, samples=20, samples_per_s=1e6), 2.0)
    assert s.paces.of(A).reported > 30.0  # shown (bounded), but a claim
    assert s.paces.for_replan(A) == 30.0
    assert s.rebalance(2.0) == [] and "balanced" in s.last_rebalance
    r = Session.from_dict(json.loads(json.dumps(s.to_dict())), now=10.0)
    assert r.paces.for_replan(A) == 30.0  # kept across a restart


def test_the_pace_after_a_multi_segment_re_plan_is_measured_from_the_whole_work():
    """A re-plan gave A a second segment (B's tail): a round of A's work is its whole work
    over the rounds, not its first segment's, and its measured pace says so."""
    s = session(epochs=1, sync_every=5)  # 10 rounds, 500 samples each
    start(s, A, B)
    _measured(s, {A: 30.0, B: 10.0}, {A: 40, B: 20}, 1.0)
    s.rebalance(1.0)
    a = s.assignments[A]
    assert len(a.ranges) > 1, a  # [0, 500) and a tail of B's
    first = a.ranges[0][1] - a.ranges[0][0]
    per_round = a.size / a.rounds
    assert per_round > first / a.rounds + 10
    s.paces.forget(A)  # measured from this upload alone
    arrive(s, A, 2.0, samples=int(per_round))
    assert s.paces.of(A).measured == pytest.approx(int(per_round) / 2.0)


def test_a_session_saved_before_the_parts_kept_themselves_still_loads():
    """tests/data/session_state_v1.json: written by the session of one file (a re-plan, A
    counted in round 1, C banned, B asked to stop); today's session restores it."""
    path = __import__("pathlib").Path(__file__).parent / "data" / "session_state_v1.json"
    old = json.loads(path.read_text())
    r = Session.from_dict(old, now=10.0)
    assert r.completed == old["completed"] and r.plan is not None
    saved = json.loads(json.dumps(r.to_dict()))
    assert saved["epochs"]["assignments"] == old["assignments"]
    assert r.members[C].state is MemberState.BANNED and C in r.roster.banned
    assert r.members[A].state is MemberState.TRAINING and r.members[A].arrived_round == 1
    assert r.paces.of(A).measured == old["members"][A]["vouched"]
    assert r.paces.for_replan(A) == old["members"][A]["pace"]
    assert (r.replans.revision, r.replans.round) == (old["revision"], old["rebalanced_round"])
    assert r.stop_requests == old["stop"]["requests"] and r.book.trained == old["trained"]
    again = Session.from_dict(saved, now=11.0)
    assert json.loads(json.dumps(again.to_dict()))["epochs"] == saved["epochs"]


def test_a_shard_of_an_epoch_that_will_never_be_planned_is_refused_at_once():
    """A node asking for an epoch the session will never plan (a restored Lightning loop
    ahead of the session) is told so at once, instead of waiting for an answer that never
    comes; the next epoch is still waited for."""
    s = session(epochs=3, min_nodes=2)
    ready(s, A)
    s.upload(A, 0, 0.0)
    s.initial(0.0)
    for epoch in (1, 2, 3, 10**6):  # nothing is planned yet: only epoch 0 can come
        r = s.shard(A, epoch, 1.0)
        assert not r.wait and r.code == "bad_epoch", (epoch, r)
        assert f"epoch {epoch} will never be planned" in r.reason
        assert "epochs 0-2" in r.reason and "plans epoch 0 next" in r.reason
    assert s.shard(A, 0, 1.0).wait  # the start gate: min_nodes=2
    ready(s, B, 1.0)
    assert s.shard(A, 0, 1.0).assignment is not None
    assert s.shard(A, 1, 1.0).wait  # the next epoch comes once epoch 0's rounds complete
    r = s.shard(A, 2, 1.0)
    assert r.code == "bad_epoch" and "plans epoch 1 next" in r.reason
    assert s.shard(A, 3, 1.0).code == "bad_epoch"  # past the session's last epoch


def test_live_nodes_that_never_upload_are_dropped_at_the_hard_deadline_and_the_round_completes():
    """Three nodes, quorum 0.5 (2 needed): only A uploads; B and C keep pinging but never
    upload (hung, or hostile). Past the deadline the round still waits for a quorum; at the
    hard deadline B and C are dropped, and the round completes with A alone."""
    s = session(min_nodes=3, quorum=0.5, deadline_floor=10.0, heartbeat_timeout=15.0)
    start(s, A, B, C, now=0.0)
    arrive(s, A, 1.0)
    hard = None
    for t in range(2, 200):
        for n in (A, B, C):
            s.seen(n, float(t))  # every node is alive
        gone, d = s.tick(float(t))
        if gone:
            hard = t
            break
        assert not d.complete, d.reason
    assert hard is not None and 10 < hard <= 60, hard
    assert sorted(n for n, _ in gone) == sorted([B, C])
    assert all("no upload for round 1 by its hard deadline" in why for _, why in gone)
    assert s.members[B].state is MemberState.LOST and s.members[C].state is MemberState.LOST
    assert d.complete and d.contributors == ((A, 100),), d.reason


def test_no_re_plan_takes_work_from_a_node_keeping_to_its_plan():
    """Epoch 1 is sized by the paces measured in epoch 0. A node then measured a hundred times
    as fast takes nothing from one that keeps its pace; once that one falls behind its plan
    (half its pace), its work moves."""
    s = session(epochs=2, sync_every=10)  # 5 rounds an epoch
    start(s, A, B)
    for t in (4.0, 8.0, 12.0, 16.0, 20.0):
        arrive(s, A, t, samples=100)
        arrive(s, B, t, samples=100)
        finish_round(s, t)
    assert s.plan is not None and s.plan.epoch == 1
    assert set(s.book.planned) == {A, B} and all(p > 0 for p in s.book.planned.values())
    planned_b = s.book.planned[B]
    _measured(s, {A: 100 * s.book.planned[A], B: planned_b}, {A: 10, B: 10}, 21.0)
    assert s.rebalance(21.0) == [] and "keep to their plans" in s.last_rebalance
    s.replans.round = -1  # another round: may re-plan again
    _measured(s, {A: 100 * s.book.planned[A], B: planned_b / 2}, {A: 10, B: 10}, 22.0)
    out = dict(s.rebalance(22.0))
    assert out and out[B].size < 500 < out[A].size, s.last_rebalance
    assert s.book.planned[A] == s.paces.for_replan(A)  # its new work is sized by this pace


def test_an_overlapped_upload_just_after_its_round_opened_is_not_measured_as_instant():
    # With overlapped rounds A trains round 2's work while round 1 is still open; round 1
    # completes late (B was slow), so A's round-2 upload comes 0.1 s after round 2 opened.
    # Its pace is its samples over the 10 s it says it trained (within the 10.1 s since its
    # round-1 upload), not over 0.1 s: a 100x pace would win it the next epoch's work.
    s = session(min_nodes=2)
    start(s, A, B)
    for n in (A, B):
        s.upload(n, 1, 10.0)
        s.arrived(n, 1, 100, 10.0, train_s=10.0)
    finish_round(s, 20.0)
    assert s.upload(A, 2, 20.1).kind is Verdict.OPEN
    s.arrived(A, 2, 100, 20.1, train_s=10.0)
    assert s.paces.of(A).measured == pytest.approx(ema(10.0, 10.0, MEASURED_SMOOTHING))
    assert s.upload(B, 2, 40.0).kind is Verdict.OPEN  # B says 1 ms: the coordinator saw 20 s
    s.arrived(B, 2, 100, 40.0, train_s=1e-3)
    assert s.paces.of(B).measured == pytest.approx(ema(10.0, 100 / 20.0, MEASURED_SMOOTHING))
