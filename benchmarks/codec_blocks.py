"""The int8 codec's block size: quantization error against bytes, on real round changes.

Trains the char-LM (``benchmarks/_common.py``) in one process and takes its change over every
``--sync-every`` optimizer steps, ``--rounds`` times: the changes a drift node uploads. Each
change is quantized as ``lightning_drift.codec`` does, with scales per block of B values, for
several B (and one scale per tensor), and the table gives

- bytes per value (codes plus float32 scales; the safetensors header not counted);
- the relative error of one encoding, ``||decoded - change|| / ||change||`` over the whole
  model, the median over the rounds (error feedback carries this error to the next round;
  it does not lose it, but a smaller one disturbs each round less);
- the same for bfloat16, for comparison.

    python benchmarks/codec_blocks.py
    python benchmarks/codec_blocks.py --rounds 8 --sync-every 100 --update-docs

The last line printed is ``codec_blocks: block <B> error <e> bytes/value <b>`` for the block
size ``lightning_drift.codec.BLOCK`` uses.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

BLOCKS = (16, 32, 64, 128, 256, 1024, 0)  # 0: one scale per tensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    c.Setup.add_args(ap, max_chars=1_000_000)
    ap.add_argument("--sync-every", type=int, default=100, help="steps per change (H)")
    ap.add_argument("--rounds", type=int, default=6, help="changes measured")
    ap.add_argument("--update-docs", action="store_true", help="write the table into docs")
    args = ap.parse_args()
    setup = c.Setup.from_args(args)
    c.configure_torch(setup)
    import torch

    from lightning_drift import codec

    data = c.make_data(setup)
    model = c.make_model(setup)
    opt = model.configure_optimizers()
    batches = iter(data.train_dataloader())
    errors: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for _ in range(args.sync_every):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(data.train_dataloader())
                x, y = next(batches)
            loss = model.loss((x, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        change = {
            k: v.detach() - before[k]
            for k, v in model.state_dict().items()
            if v.is_floating_point()
        }
        norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in change.values()))
        for b in BLOCKS:
            err = 0.0
            for d in change.values():
                block = b or max(1, d.numel())
                codes, scales = codec.quantize(d, block)
                got = codec.dequantize(codes, scales, block)
                err += float(((got - d).double() ** 2).sum())
            errors.setdefault(_name(b), []).append(math.sqrt(err) / norm)
        err = sum(
            float(((d.to(torch.bfloat16).float() - d).double() ** 2).sum()) for d in change.values()
        )
        errors.setdefault("bfloat16", []).append(math.sqrt(err) / norm)
    numels = [v.numel() for v in model.state_dict().values() if v.is_floating_point()]
    total = sum(numels)
    rows = []
    for b in BLOCKS:
        scales = sum(math.ceil(n / (b or n)) for n in numels)
        rows.append(
            [
                _name(b) + (" (drift)" if b == codec.BLOCK else ""),
                f"{(total + 4 * scales) / total:.4f}",
                f"{statistics.median(errors[_name(b)]):.4f}",
            ]
        )
    rows.append(["bfloat16", "2.0000", f"{statistics.median(errors['bfloat16']):.4f}"])
    text = c.table(["int8 scales per", "bytes/value", "relative error (median)"], rows)
    text += (
        f"\n\n- Setup: {setup.describe()}; {args.rounds} changes of {args.sync_every} AdamW "
        f"steps each, {total} floating values in the model."
    )
    print(text)
    ours = next(r for r in rows if r[0].endswith("(drift)"))
    line = f"codec_blocks: block {codec.BLOCK} error {ours[2]} bytes/value {ours[1]}"
    if args.update_docs:
        c.update_docs("codec_blocks", f"```\n{c.command_line()}\n```\n\n{text}\n\n`{line}`")
    print(line)


def _name(b: int) -> str:
    return f"block of {b}" if b else "tensor (one scale)"


if __name__ == "__main__":
    main()
