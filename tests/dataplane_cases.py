"""Rounds of the star and of the sharded data plane on the same uploads, for the data plane's
tests (in process, and in subprocesses under other ``ATEN_CPU_CAPABILITY`` settings)."""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import torch

from lightning_drift import codec
from lightning_drift.aggregate import to_bytes
from lightning_drift.checkpoint import CheckpointStore
from lightning_drift.coordinator.aggregation import Aggregation
from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.dataplane.plan import ShardPlan
from lightning_drift.dataplane.reduce import (
    Piece,
    ShardState,
    check_sums,
    outer_rule,
    reduce_shard,
)
from lightning_drift.modelspec import carried, table_of

NODES = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
WEIGHTS = (37.0, 12.5, 3.0, 101.25)


def _draw(shape: tuple[int, ...], g: torch.Generator, scale: float) -> torch.Tensor:
    """Seeded values whose bits no CPU kernel can change: integers times a power of two."""
    return torch.randint(-1000, 1001, shape, generator=g).to(torch.float64) * scale


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    """Odd-sized tensors of every kind a state dict holds."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(5, 29)
    mask[:, 17:] = float("-inf")
    return {
        "emb.weight": _draw((37, 23), g, 2**-10).float(),
        "half": _draw((301,), g, 2**-10).half(),
        "bf": _draw((7, 19), g, 2**-10).bfloat16(),
        "wide": _draw((130,), g, 2**-10),
        "steps": torch.tensor(40, dtype=torch.int64),
        "keep": torch.tensor([True, False, True]),
        "mask": mask,
        "empty": torch.zeros(0),
        "lin.weight": _draw((64, 65), g, 2**-10).float(),
        "lin.bias": _draw((1,), g, 2**-10).float(),
    }


def local(global_sd: dict[str, torch.Tensor], node: int, rnd: int) -> dict[str, torch.Tensor]:
    """A node's weights after a round of "training": a seeded move of every trained tensor."""
    g = torch.Generator().manual_seed(1000 * rnd + node)
    out = {}
    for k, v in global_sd.items():
        if k == "mask":
            out[k] = v.clone()
        elif v.is_floating_point():
            step = _draw(tuple(v.shape), g, 2**-17 * (node + 1))
            out[k] = (v.to(torch.float64) + step).to(v.dtype)
        elif v.dtype == torch.bool:
            out[k] = torch.tensor([node % 2 == 0, True, rnd % 2 == 0])
        else:
            out[k] = v + 10 + node
    return out


def run(codec_name: str, method: str, count: int, rounds: int = 3) -> dict[str, str]:
    """Both planes over ``rounds`` rounds; the sha256 of what each ends with, and whether
    every round's download change and new weights were the same bytes."""
    aggregation = "diloco" if method == "diloco" else "mean"
    robust = method if method in ("trimmed", "median") else "off"
    # The outer lr by contributors, ramped up over the first two rounds: both planes must
    # step with the same float every round.
    config = SessionConfig(
        dataset_size=100, transfer_dtype=codec_name, aggregation=aggregation, robust=robust,
        outer_warmup=2,
    )  # fmt: skip
    rule = outer_rule(
        aggregation, config.outer_lr, config.outer_momentum, robust, config.trim, 0.0,
        config.outer_warmup,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        star = Aggregation(config, CheckpointStore(Path(tmp)), clock=lambda: 0.0)
        global_sd = model()
        plan = ShardPlan(table_of(global_sd), codec_name, count)
        fixed = carried(global_sd)
        states = [ShardState() for _ in range(count)]
        uploads = [codec.Residual() for _ in NODES]
        same = True
        reports = hashlib.sha256()
        for rnd in range(1, rounds + 1):
            acc = star.new_accumulator(global_sd)
            payloads = []
            for i, node in enumerate(NODES):
                change = codec.difference(local(global_sd, i, rnd), global_sd)
                payloads.append(codec.encode(change, codec_name, uploads[i]).payload)
                acc.add(node, codec.decode(payloads[-1], global_sd), WEIGHTS[i], delta=True)
            new_sd, blob, _info, refused, delta = star.run("s", rnd, 1, acc, global_sd)
            assert refused is None and delta is not None
            cut = [plan.pieces(p) for p in payloads]
            results = [
                reduce_shard(
                    plan,
                    j,
                    global_sd,
                    fixed,
                    [Piece(n, WEIGHTS[i], cut[i][j]) for i, n in enumerate(NODES)],
                    states[j],
                    rule,
                    rnd,
                )
                for j in range(count)
            ]
            assert check_sums(plan, fixed, [r.sums for r in results], config.max_change) is None
            # What the books compare between two computers must not depend on the CPU either.
            reports.update(
                repr([(sorted(r.sums.items()), sorted(r.norms2.items())) for r in results]).encode()
            )
            pieces = [r.piece or b"" for r in results]
            sharded = codec.apply(
                global_sd, plan.assemble([plan.read(j, p) for j, p in enumerate(pieces)])
            )
            same = same and plan.join(pieces) == delta[0] and to_bytes(sharded) == blob
            states = [r.state for r in results]
            global_sd = new_sd
        momentum = plan.merge([s.momentum for s in states])
        residual = plan.merge([s.residual for s in states])
        star_momentum = star.diloco.state_dict() if star.diloco is not None else {}
        return {
            "weights": _sha(to_bytes(global_sd)),
            "sharded_weights": _sha(to_bytes(sharded)),
            "momentum": _sha(to_bytes(momentum)) if momentum else "",
            "star_momentum": _sha(to_bytes(star_momentum)) if star_momentum else "",
            "residual": _sha(to_bytes(residual)),
            "star_residual": _sha(to_bytes(star.residual.state_dict())),
            "same_every_round": str(same),
            "reports": reports.hexdigest(),
        }


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


if __name__ == "__main__":  # python tests/dataplane_cases.py CODEC METHOD COUNT
    print(run(sys.argv[1], sys.argv[2], int(sys.argv[3])))
