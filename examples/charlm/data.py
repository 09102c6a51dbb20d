"""Byte-level text windows from the Python standard library's own source files.

Every machine that runs Python has this text, so a drift session can train on it with no
download. The selection is deterministic: the top-level ``*.py`` files of
``sysconfig.get_paths()["stdlib"]`` sorted by file name, concatenated, cut at ``max_chars``
bytes. The vocabulary is the 256 byte values, the same everywhere whatever the text.

Dataset sizes depend only on ``max_chars``, ``block_size`` and ``stride``, so they are identical
on every machine whose standard library holds at least ``max_chars`` bytes of top-level source
(about 4.7 MB on CPython 3.11). The *bytes* are identical for the same Python version; another
version (or a distribution that patches the standard library) trains on slightly different
text of the same size.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

VOCAB_SIZE = 256


def stdlib_files() -> list[Path]:
    """The top-level ``*.py`` files of this interpreter's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.as_posix())


def load_text(max_chars: int | None = 200_000, path: str | Path | None = None) -> bytes:
    """The training text as bytes: the first ``max_chars`` bytes of the selected files.

    ``path`` (a file, or a directory whose files are taken in sorted order) replaces the
    standard library; then fewer than ``max_chars`` bytes is fine. For the standard library
    it is an error, because nodes with different dataset sizes cannot share a session.
    """
    files = _files_under(Path(path)) if path is not None else stdlib_files()
    chunks: list[bytes] = []
    size = 0
    for f in files:
        if max_chars is not None and size >= max_chars:
            break
        data = f.read_bytes()
        if data and not data.endswith(b"\n"):
            data += b"\n"
        chunks.append(data)
        size += len(data)
    text = b"".join(chunks)[:max_chars]
    if path is None and max_chars is not None and len(text) < max_chars:
        raise ValueError(
            f"the standard library at {sysconfig.get_paths()['stdlib']} holds only {len(text)} "
            f"bytes of top-level source, fewer than max_chars={max_chars}; lower max_chars "
            "(every node of a session must use the same value) or pass path="
        )
    return text


class ByteWindows(Dataset):
    """Windows of ``block_size + 1`` bytes every ``stride`` bytes: ``(x, y)`` with y = x shifted.

    ``len = (len(data) - block_size - 1) // stride + 1`` (0 when the data is too short).
    """

    def __init__(self, data: torch.Tensor, block_size: int, stride: int) -> None:
        if block_size < 1 or stride < 1:
            raise ValueError(f"block_size and stride must be >= 1, got {block_size}, {stride}")
        self.data = data
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        n = len(self.data) - self.block_size - 1
        return n // self.stride + 1 if n >= 0 else 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.stride
        chunk = self.data[start : start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


class CharDataModule(L.LightningDataModule):
    """Byte windows of the standard library's source; train on the first 90 %, validate on the rest.

    Args:
        max_chars: bytes of text to use (the first ``max_chars`` of the sorted files).
        block_size: context length in bytes; must match the model's ``block_size``.
        stride: bytes between window starts; defaults to ``block_size`` (no overlap).
        batch_size: windows per batch.
        val_fraction: the last fraction of the text held out for validation.
        path: a text file or directory to use instead of the standard library.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        max_chars: int = 200_000,
        block_size: int = 64,
        stride: int | None = None,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        path: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        self.max_chars = max_chars
        self.block_size = block_size
        self.stride = stride or block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.path = path
        self.num_workers = num_workers
        self.vocab_size = VOCAB_SIZE
        self.train_dataset: ByteWindows | None = None
        self.val_dataset: ByteWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        text = load_text(self.max_chars, self.path)
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        # Split the text, not the windows, so that no validation byte is ever trained on.
        cut = len(data) - int(len(data) * self.val_fraction)
        self.train_dataset = ByteWindows(data[:cut], self.block_size, self.stride)
        self.val_dataset = ByteWindows(data[cut:], self.block_size, self.stride)

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "call setup() first"
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_dataset is not None, "call setup() first"
        return DataLoader(
            self.val_dataset, batch_size=self.batch_size, num_workers=self.num_workers
        )
