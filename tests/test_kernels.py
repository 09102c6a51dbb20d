"""The aggregate's bits depend neither on the CPU's kernels nor on how a tensor is cut.

A round's aggregate will be computed per shard (runs of whole int8 blocks of a tensor,
flattened in C order) on different machines, and must equal the single coordinator's, bit
for bit. So the star's numerics (weighted mean, DiLoCo step, int8 encode with error feedback,
apply, trimmed mean, median) are run here under every vector width torch can pick on this CPU
(``ATEN_CPU_CAPABILITY``, one process each) and on slices cut at multiples of 64 values.

Run as a script, this file prints the hashes of a few seeded rounds: the test compares them.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from lightning_drift import codec
from lightning_drift.aggregate import Accumulator, DiLoCo, StateDict, to_bytes
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.robust import RobustAccumulator

ROUNDS = 3
WEIGHTS = (7.3, 11.1, 3.7, 0.9, 5.55)  # samples per node: non-round, so the mean rounds
_TRIU = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)


def model() -> StateDict:
    """Global weights with odd sizes: partial int8 blocks, vector tails, and a tensor large
    enough (over 32768 values) that torch splits its elementwise loops over threads."""
    rng = random.Random(11)
    return {
        "w32": _values(rng, (37, 1001), torch.float32),
        "w64": _values(rng, (129,), torch.float64),
        "w16": _values(rng, (3, 67), torch.float16),
        "wbf": _values(rng, (65,), torch.bfloat16),
        "steps": torch.tensor(41, dtype=torch.int64),
        "mask": torch.zeros(5, 5).masked_fill(_TRIU, float("-inf")),  # carried
    }


def _values(rng: random.Random, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # From Python's generator, not torch's: torch.randn's own bits depend on the vector width.
    n = 1
    for s in shape:
        n *= s
    vals = torch.tensor([rng.gauss(0.0, 1.0) for _ in range(n)], dtype=torch.float64)
    return vals.reshape(shape).to(dtype)


def uploads(glob: Mapping[str, torch.Tensor], completed_round: int) -> list[StateDict]:
    """Each node's weights after training from ``glob``: seeded noise of a few sizes, the
    counter moved by a few steps, the carried mask as it was."""
    out = []
    for i in range(len(WEIGHTS)):
        rng = random.Random(1000 * completed_round + i)
        scale = 10.0 ** rng.randint(-4, -1)
        up: StateDict = {}
        for k, v in glob.items():
            if k == "mask":
                up[k] = v.clone()
            elif v.is_floating_point():
                noise = _values(rng, tuple(v.shape), torch.float64) * scale
                up[k] = (v.to(torch.float64) + noise).to(v.dtype)
            else:
                up[k] = v + rng.randint(0, 3)
        out.append(up)
    return out


def as_delta(upload: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor]) -> StateDict:
    """``upload`` as a bfloat16 delta against ``glob``, as a node sends it."""
    change = codec.difference(upload, glob)
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in change.items()}


class Star:
    """The coordinator's numerics of a session, one completed round per :meth:`round`."""

    def __init__(self, glob: StateDict) -> None:
        self.glob = glob
        self.outer = DiLoCo(lr=0.7, momentum=0.6, nesterov=True)
        self.residual = codec.Residual()

    def round(self, ups: list[StateDict]) -> dict[str, StateDict]:
        """Fold ``ups`` in (the first as a bfloat16 delta), step, encode the download with
        error feedback and apply it; the robust combinations of the same uploads too."""
        acc = Accumulator(self.glob)
        for i, (up, w) in enumerate(zip(ups, WEIGHTS, strict=True)):
            if i == 0:
                acc.add(f"node{i}", as_delta(up, self.glob), w, delta=True)
            else:
                acc.add(f"node{i}", up, w)
        mean = acc.mean()
        stepped = self.outer.step(self.glob, mean)
        encoded = codec.encode(codec.difference(stepped, self.glob), "int8", self.residual)
        robust = {}
        for method in ("trimmed", "median"):
            r = RobustAccumulator(self.glob, method=method, trim=0.2)
            for i, (up, w) in enumerate(zip(ups, WEIGHTS, strict=True)):
                r.add(f"node{i}", up, w)
            robust[method] = r.mean()
        old, self.glob = self.glob, codec.apply(self.glob, encoded.applied)
        return {
            "base": old,
            "mean": mean,
            "stepped": stepped,
            "applied": encoded.applied,
            "weights": self.glob,
            "momentum": self.outer.state_dict(),
            "residual": self.residual.state_dict(),
            **robust,
        }


def hashes() -> list[str]:
    """``name=sha256`` of what each of a few seeded rounds produced."""
    star = Star(model())
    lines = []
    for completed_round in range(ROUNDS):
        got = star.round(uploads(star.glob, completed_round))
        for name in ("weights", "momentum", "residual", "trimmed", "median"):
            lines.append(f"{completed_round}/{name}={sha256_bytes(to_bytes(got[name]))}")
    return lines


# -- the CPU's kernels ------------------------------------------------------------------------


def capabilities() -> list[str]:
    """The ``ATEN_CPU_CAPABILITY`` values this CPU can run: always ``default``, and on x86
    the vector widths its flags allow (torch's avx512 kernels need avx512 f/bw/vl/dq)."""
    caps = ["default"]
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return caps
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    if {"avx2", "fma"} <= flags:
        caps.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        caps.append("avx512")
    return caps


def test_every_cpu_kernel_gives_the_same_aggregate():
    # Prepare
    caps = capabilities()
    machine = os.uname().machine
    if machine in ("x86_64", "AMD64"):
        assert len(caps) > 1, "an x86 CPU without avx2: no vector kernel to compare with"
    root = Path(__file__).resolve().parents[1]
    procs = {}

    # Execute
    for cap in caps:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
        procs[cap] = subprocess.Popen(
            [sys.executable, __file__],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    out = {}
    for cap, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"ATEN_CPU_CAPABILITY={cap}: no answer in 120 s\n{stderr}")
        assert proc.returncode == 0, f"ATEN_CPU_CAPABILITY={cap} failed:\n{stderr}"
        out[cap] = stdout.split()

    # Assert
    assert len(out["default"]) == ROUNDS * 5
    for cap in caps[1:]:
        diff = [a for a, b in zip(out["default"], out[cap], strict=True) if a != b]
        assert not diff, f"{cap} differs from default: {diff}"


# -- slices ---------------------------------------------------------------------------------


def cuts(numel: int, seed: int) -> list[int]:
    """Uneven cut points at multiples of 64 values (0 and ``numel`` included)."""
    rng = random.Random(seed)
    points = [0]
    while points[-1] + 64 < numel:
        points.append(min(numel, points[-1] + 64 * rng.choice((1, 2, 5, 17))))
    if points[-1] != numel:
        points.append(numel)
    return points


def sliced(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Every tensor flattened in C order and cut into slices named ``name#i``."""
    out: StateDict = {}
    for j, (k, v) in enumerate(sd.items()):
        flat = v.reshape(-1)
        points = cuts(flat.numel(), j)
        for i, (a, b) in enumerate(zip(points, points[1:], strict=False)):
            out[f"{k}#{i}"] = flat[a:b].clone()
    return out


def joined(parts: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> StateDict:
    """The slices of :func:`sliced` put back together in the shapes of ``like``."""
    out: StateDict = {}
    for k, ref in like.items():
        mine = [v for name, v in parts.items() if name.rpartition("#")[0] == k]
        out[k] = torch.cat(mine).reshape(ref.shape)
    return out


def test_cuts_fall_on_whole_int8_blocks():
    points = cuts(37037, 0)
    assert points[0] == 0 and points[-1] == 37037 and len(points) > 3
    assert all(p % codec.BLOCK == 0 for p in points[:-1])
    sd = model()
    assert all(torch.equal(joined(sliced(sd), sd)[k], sd[k]) for k in sd)


def test_slices_cut_at_int8_blocks_give_the_whole_tensors_bits():
    # Prepare: one star on whole tensors, one on their slices (its own momentum and residual
    # per slice, as a shard's coordinator would hold them)
    whole = Star(model())
    parts = Star(sliced(model()))
    assert len(parts.glob) > 2 * len(whole.glob)

    for completed_round in range(ROUNDS):
        ups = uploads(whole.glob, completed_round)

        # Execute
        got = whole.round(ups)
        got_parts = parts.round([sliced(up) for up in ups])

        # Assert
        for name, sd in got.items():
            back = joined(got_parts[name], sd)
            for k, v in sd.items():
                assert v.dtype == back[k].dtype, (completed_round, name, k)
                assert to_bytes({k: v}) == to_bytes({k: back[k]}), (completed_round, name, k)
    assert len(whole.outer.state_dict()) == 4  # momentum kept for every floating tensor
    assert len(whole.residual) == 5  # and a residual for every one, the carried mask too


def test_int8_blocks_of_a_slice_are_the_whole_tensors_blocks():
    # Prepare
    x = model()["w32"].reshape(-1) * 1e-3
    points = cuts(x.numel(), 7)

    # Execute
    codes, scales = codec.quantize(x)
    pieces = [codec.quantize(x[a:b]) for a, b in zip(points, points[1:], strict=False)]

    # Assert
    assert torch.equal(codes, torch.cat([c for c, _ in pieces]))
    assert torch.equal(scales, torch.cat([s for _, s in pieces]))
    back = codec.dequantize(codes, scales, codec.BLOCK)
    back_pieces = [codec.dequantize(c, s, codec.BLOCK) for c, s in pieces]
    assert torch.equal(back, torch.cat(back_pieces))


@pytest.mark.parametrize("method", ["off", "trimmed", "median"])
def test_many_contributors_combine_alike_whole_or_sliced(method):
    # torch's own reduction over the contributors (sum(0), mean(0)) associates its additions
    # by the shape, so with a few dozen contributors the whole tensor and its slices differed
    # in a last bit; the robust combination must not.
    # Prepare: 40 contributors, changes of very different sizes
    rng = random.Random(5)
    glob = {"w": torch.zeros(40001, dtype=torch.float64)}
    ups = []
    for _ in range(40):
        v = _values(rng, (40001,), torch.float64)
        ups.append({"w": v * torch.tensor([10.0 ** rng.randint(-8, 8) for _ in range(40001)])})

    def combine(g: StateDict, parts: list[StateDict]) -> StateDict:
        r = RobustAccumulator(g, method=method, trim=0.2)
        for i, up in enumerate(parts):
            r.add(f"node{i}", up, WEIGHTS[i % len(WEIGHTS)])
        return r.mean()

    # Execute
    whole = combine(glob, ups)
    parts = combine(sliced(glob), [sliced(up) for up in ups])

    # Assert
    assert to_bytes(whole) == to_bytes(joined(parts, whole))
    assert len(sliced(glob)) > 10


if __name__ == "__main__":
    print("\n".join(hashes()))
