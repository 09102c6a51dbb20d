"""The views: what a session shows, from its parts."""

from __future__ import annotations

from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.session import Session
from lightning_drift.coordinator.views import session_state, status, train_config


def test_a_fresh_session_waits_and_says_so():
    s = Session(SessionConfig(dataset_size=100, epochs=3), session_id="s1", now=5.0)
    s.join("a" * 64, "a", 5.0)
    st = status(s, 6.0)
    assert session_state(s) == "waiting" and st.state == "waiting" and st.started_at == 5.0
    assert [n.state for n in st.nodes] == ["joined"] and st.nodes[0].samples_per_s == 0.0
    tc = train_config(s)
    assert (tc.session_id, tc.epochs, tc.stop_round, tc.dataset_size) == ("s1", 3, -1, 100)
    s.finished = True
    assert session_state(s) == "finished"
