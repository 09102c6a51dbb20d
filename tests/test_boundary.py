"""The trust boundary and the model's tensor table: what a node says is bounded before use."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support import wire

from lightning_drift import codec, modelspec
from lightning_drift import protocol as p
from lightning_drift.aggregate import to_bytes
from lightning_drift.coordinator import boundary
from lightning_drift.errors import SessionError
from lightning_drift.protocol import BarrierSync, DeviceInfo, Join, NodeInfo, TrainProgress
from lightning_drift.text import clean_text

FP = "ab" * 32


def info(**kw) -> NodeInfo:
    base = dict(
        nonce="n",
        devices=[],
        train_device="cpu",
        cpu="cpu",
        cpu_count=4,
        memory=1 << 30,
        calibration=50.0,
        torch_version="2",
        dataset_size=100,
        model_fingerprint=FP,
    )
    base.update(kw)
    return NodeInfo(**base)


def model() -> dict[str, torch.Tensor]:
    return {
        "w": torch.zeros(4, 3),
        "b": torch.zeros(3, dtype=torch.float16),
        "steps": torch.tensor(0, dtype=torch.int64),
    }


# ---- text ---------------------------------------------------------------------------------


def test_clean_text_removes_what_drives_a_terminal_or_forges_a_line():
    evil = "gpu\x1b[2J\x1b]0;pwned\x07\nINFO forged line\r\u202eevil\u200b\x00"
    out = clean_text(evil, 200)
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in out)
    assert "\u202e" not in out and "\u200b" not in out and "\n" not in out
    assert out.startswith("gpu [2J ]0;pwned INFO forged line")


@given(st.text(max_size=3000), st.integers(1, 300))
def test_clean_text_is_bounded_and_printable(text, limit):
    out = clean_text(text, limit)
    assert len(out) <= limit
    assert all(c.isprintable() or c == " " for c in out)


# ---- messages -----------------------------------------------------------------------------


def test_node_info_is_bounded_and_cleaned():
    raw = info(
        devices=[DeviceInfo(name="x\n" * 1000, kind="cuda", vram_total=-5, index=10**9)] * 100,
        calibration=1e308,
        cpu_count=10**9,
        memory=-1,
        hostname="[/]\x1b[31m" * 1000,
        model_fingerprint=FP.upper(),
    )
    out = boundary.node_info(raw)
    assert len(out.devices) == boundary.DEVICES_MAX
    d = out.devices[0]
    assert len(d.name) <= boundary.NAME_MAX and "\n" not in d.name
    assert d.vram_total == 0 and d.index == 1024
    assert out.calibration == boundary.CALIBRATION_MAX
    assert out.cpu_count == boundary.CPU_COUNT_MAX and out.memory == 0
    assert len(out.hostname) <= boundary.NAME_MAX and "\x1b" not in out.hostname
    assert out.model_fingerprint == FP  # lower case
    for bad in (float("nan"), float("-inf"), -3.0):
        assert boundary.node_info(info(calibration=bad)).calibration == 0.0  # unknown


@pytest.mark.parametrize(
    "given, kept",
    [
        ("ab" * 32 + "@127.0.0.1:4242", True),
        ("AB" * 32 + "@10.0.0.1:1", True),
        ("ab" * 32 + "@host-without-port", False),
        ("not a peer\n\x1b[31m", False),
        ("ab" * 32 + "@127.0.0.1:4242" + "x" * 2000, False),
        ("", False),
    ],
)
def test_a_data_endpoint_is_kept_only_when_it_names_a_peer(given, kept):
    out = boundary.node_info(info(data_peer=given)).data_peer
    assert out == (given.strip().lower() if kept else "")


def test_a_progress_reports_data_bytes_bounded():
    assert (
        boundary.progress(
            TrainProgress(round=1, epoch=0, step=1, samples=1, data_bytes=-9)
        ).data_bytes
        == 0
    )
    big = boundary.progress(TrainProgress(round=1, epoch=0, step=1, samples=1, data_bytes=10**30))
    assert big.data_bytes == boundary.COUNT_MAX


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"dataset_size": 0}, "dataset_size 0 is not a dataset size"),
        ({"dataset_size": -7}, "dataset_size -7"),
        ({"model_fingerprint": ""}, "model_fingerprint must be the sha256"),
        ({"model_fingerprint": "zz" * 32}, "64 hex digits"),
    ],
)
def test_node_info_that_no_clamp_can_fix_is_refused(kw, message):
    with pytest.raises(boundary.BadInput, match=message) as exc:
        boundary.node_info(info(**kw))
    assert exc.value.code == "bad_input"


def test_reported_numbers_are_clamped():
    p = boundary.progress(
        TrainProgress(
            round=-4, epoch=2**40, step=-1, samples=2**62, loss=float("inf"), samples_per_s=1e308
        )
    )
    assert (p.round, p.epoch, p.step) == (0, boundary.ROUND_MAX, 0)
    assert p.samples == boundary.COUNT_MAX and p.loss is None
    assert p.samples_per_s == boundary.PACE_MAX
    assert boundary.progress(TrainProgress(round=1, epoch=0, step=0, samples=0)).samples_per_s == 0
    b = boundary.barrier_sync(BarrierSync(round=3, samples=-9, train_seconds=5e-324, loss=1e31))
    assert b.samples == 0 and b.train_seconds == boundary.TRAIN_S_MIN and b.loss is None
    assert boundary.barrier_sync(BarrierSync(round=-9)).round == -1
    j = boundary.join(Join(token="t", node_key="k", drift_version="x" * 999, name="a\nb" * 99))
    assert len(j.name) <= boundary.NAME_MAX and "\n" not in j.name


def test_a_rate_is_believed_within_the_pace_factor_of_what_was_measured():
    f = boundary.PACE_FACTOR
    assert boundary.bound_pace(1e-9, 100.0) == 100.0 / f
    assert boundary.bound_pace(1e9, 100.0) == 100.0 * f
    assert boundary.bound_pace(150.0, 100.0) == 150.0
    assert boundary.bound_pace(1e-9, None) == boundary.PACE_MIN
    assert boundary.bound_pace(float("inf"), None) == 0.0  # not a rate: unknown


# ---- the tensor table and the upload check -------------------------------------------------


def test_fingerprint_does_not_depend_on_order_and_reads_from_the_header():
    sd = model()
    reordered = dict(reversed(list(sd.items())))
    assert modelspec.state_fingerprint(sd) == modelspec.state_fingerprint(reordered)
    blob = to_bytes(sd)
    header = modelspec.read_header(blob[: modelspec.header_needs(blob)])
    assert header.table == modelspec.table_of(sd) and header.size == len(blob)
    assert modelspec.fingerprint(header.table) == modelspec.state_fingerprint(sd)
    sd2 = dict(sd, w=torch.zeros(3, 4))
    assert modelspec.state_fingerprint(sd2) != modelspec.state_fingerprint(sd)


def test_upload_check_decides_from_the_header_before_the_body():
    sd = model()
    table = modelspec.table_of(sd)
    blob = to_bytes(sd)
    need = modelspec.header_needs(blob)
    check = boundary.UploadCheck(fingerprint="", table=table)
    assert check(blob[:3], len(blob)) == 4  # enough to tell a compact change from safetensors
    assert check(blob[:4], len(blob)) == 8  # the length first
    assert check(blob[:8], len(blob)) == need  # then the whole header
    assert check(blob[:need], len(blob)) == 0  # good: the body may be read
    with pytest.raises(SessionError, match="implies") as exc:
        check(blob[:need], len(blob) + 1)  # a blob bigger than its header says
    assert exc.value.code == "bad_upload"
    other = to_bytes(dict(sd, w=torch.zeros(5, 3)))
    with pytest.raises(SessionError, match=r"'w' has shape \(5, 3\), the model has \(4, 3\)"):
        check(other[: modelspec.header_needs(other)], len(other))
    half = to_bytes({k: v.half() if v.is_floating_point() else v for k, v in sd.items()})
    with pytest.raises(SessionError, match="dtype"):
        check(half[: modelspec.header_needs(half)], len(half))
    delta = boundary.UploadCheck(fingerprint="", table=table, delta=True)
    assert delta(half[: modelspec.header_needs(half)], len(half)) == 0  # deltas: any float
    # Before round 0 only the fingerprint the nodes announced is known.
    pinned = boundary.UploadCheck(fingerprint=modelspec.state_fingerprint(sd))
    assert pinned(blob[:need], len(blob)) == 0
    with pytest.raises(SessionError, match="not the model the nodes announced"):
        pinned(other[: modelspec.header_needs(other)], len(other))


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_upload_check_takes_a_compressed_change_in_its_codec_layout_only(dtype):
    """A compressed change is checked from its header too: the codec's layout of the model's
    table (codes and per-block scales for int8), nothing more, nothing less."""
    import safetensors.torch

    sd = model()
    table = modelspec.table_of(sd)
    check = boundary.UploadCheck(fingerprint="", table=table, delta=True)
    change = {k: (v * 0.01 if v.is_floating_point() else v) for k, v in sd.items()}
    good = codec.encode(change, dtype).payload  # compact: the codec's name, then the body
    name = f"int8/{codec.BLOCK}" if dtype == "int8" else "bfloat16"
    assert good.startswith(codec.COMPACT + bytes([len(name)]) + name.encode())
    assert check(good[:4], len(good)) == 5  # its name's length first
    assert check(good[:5], len(good)) == 5 + len(name)  # then its name
    assert check(good[: 5 + len(name)], len(good)) == 0  # good: the body may be read
    head = good[: 5 + len(name)]
    with pytest.raises(SessionError, match=f"a compact {name} change of it is {len(good)} bytes"):
        check(head, len(good) + 1)  # a body of another size: another model
    for bad, why in [
        (codec.COMPACT + b"\x07zstd/99", "unknown codec"),
        (codec.COMPACT + b"\x00", "codec name of 0 bytes"),
        (codec.COMPACT + bytes([200]), "codec name of 200 bytes"),
        (codec.COMPACT + b"\x04in\nt", "not printable"),
    ]:
        with pytest.raises(SessionError, match=why) as exc:
            check(bad, len(good))
        assert exc.value.code == "bad_upload"
    whole = boundary.UploadCheck(fingerprint="", table=table)  # whole weights were due
    with pytest.raises(SessionError, match="a compact change where whole weights were due"):
        whole(head, len(good))
    # The same change as safetensors (any safetensors tool reads it) is checked by its table.
    meta = {codec.META_CODEC: name}
    tensors = wire(good, sd)
    legacy = safetensors.torch.save(tensors, metadata=meta)
    assert check(legacy[: modelspec.header_needs(legacy)], len(legacy)) == 0
    extra = safetensors.torch.save(dict(tensors, **{"codes/zz": torch.zeros(3, dtype=torch.int8)}),
                                   metadata=meta)  # fmt: skip
    with pytest.raises(SessionError, match="not in the model"):
        check(extra[: modelspec.header_needs(extra)], len(extra))
    short = safetensors.torch.save(dict(list(tensors.items())[1:]), metadata=meta)
    with pytest.raises(SessionError, match="missing"):
        check(short[: modelspec.header_needs(short)], len(short))
    alien = safetensors.torch.save(tensors, metadata={codec.META_CODEC: "zstd/9"})
    with pytest.raises(SessionError, match="unknown codec"):
        check(alien[: modelspec.header_needs(alien)], len(alien))
    # Before round 0 (no table yet) an empty start-up upload asks for the weights.
    with pytest.raises(SessionError) as exc:
        boundary.UploadCheck(fingerprint=FP)(b"", 0)
    assert exc.value.code == "need_weights"


def test_absurd_headers_are_refused():
    check = boundary.UploadCheck(fingerprint=FP)
    huge = (modelspec.MAX_HEADER + 1).to_bytes(8, "little")
    with pytest.raises(SessionError, match="over the"):
        check(huge, 10**12)
    with pytest.raises(SessionError, match="longer than the blob"):
        check((100).to_bytes(8, "little"), 50)
    junk = (5).to_bytes(8, "little") + b"nope!"
    with pytest.raises(SessionError, match="not JSON"):
        check(junk, 13)
    gap = msgspec.json.encode(
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    )  # starts at 4: a gap
    with pytest.raises(SessionError, match="must be packed"):
        check(len(gap).to_bytes(8, "little") + gap, 8 + len(gap) + 8)
    lie = msgspec.json.encode({"a": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 4]}})
    with pytest.raises(SessionError, match="disagree"):
        check(len(lie).to_bytes(8, "little") + lie, 8 + len(lie) + 4)


def test_the_ranges_are_sane():
    assert math.isfinite(boundary.PACE_MAX * boundary.COUNT_MAX)
    assert boundary.PACE_FACTOR > 1


def test_what_the_boundary_changed_is_said_for_the_log():
    raw = info(calibration=1e308, cpu="x\ny", devices=[DeviceInfo(name="d", kind="cuda")] * 40)
    assert boundary.bounded(raw, boundary.node_info(raw)) == [
        "devices cut to 16",
        "cpu cleaned",
        "calibration 1e+308 → 1e+06",
    ]
    ok = info()
    assert boundary.bounded(ok, boundary.node_info(ok)) == []


@pytest.mark.parametrize(
    "message, check",
    [
        (p.Join, boundary.join),
        (p.NodeInfo, boundary.node_info),
        (p.TrainProgress, boundary.progress),
        (p.BarrierSync, boundary.barrier_sync),
        (p.ShardRequest, boundary.shard_request),
        (p.StopRequest, boundary.stop_request),
    ],
)
def test_every_field_a_node_sends_has_a_rule_at_the_boundary(message, check):
    """A field added to a message later must get its bound here too: a field the boundary
    neither names nor rebuilds would reach the session unchecked (or be dropped silently)."""
    import inspect

    source = inspect.getsource(check)
    exempt = {"token", "node_key", "observe", "kind", "delta"}  # checked elsewhere, or bool/Literal
    for f in msgspec.structs.fields(message):
        if f.name in exempt:
            continue
        assert f"msg.{f.name}" in source, f"{message.__name__}.{f.name} has no rule in boundary"
