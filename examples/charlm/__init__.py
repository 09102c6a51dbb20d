"""A small byte-level transformer language model on the Python standard library's source."""

from .data import VOCAB_SIZE, ByteWindows, CharDataModule, load_text, stdlib_files
from .model import CharLM

__all__ = ["VOCAB_SIZE", "ByteWindows", "CharDataModule", "CharLM", "load_text", "stdlib_files"]
