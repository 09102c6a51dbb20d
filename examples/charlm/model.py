"""A small decoder-only transformer over bytes, as a LightningModule."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from .data import VOCAB_SIZE


class CharLM(L.LightningModule):
    """Next-byte prediction with a pre-norm causal transformer.

    The output head has its own weights (no tying with the embedding), so every tensor of the
    state dict is a separate parameter: weight averaging treats them independently.

    Args:
        vocab_size: number of token values; 256 for the byte vocabulary of ``CharDataModule``.
        d_model: width of the embeddings and of every layer.
        n_layers: number of transformer blocks.
        n_heads: attention heads per block; must divide ``d_model``.
        block_size: longest context in tokens; must match the datamodule's ``block_size``.
        dropout: dropout probability inside the blocks (0 keeps training deterministic).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        block_size: int = 64,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        self.save_hyperparameters()
        self.block_size = block_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            dim_feedforward=4 * d_model,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, time, vocab)`` for byte ids ``x`` of shape ``(batch, time)``."""
        t = x.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size={self.block_size}")
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the next byte over a batch ``(x, y)``: what training and
        validation minimise, and what the benchmarks compute outside a Trainer."""
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        loss = self.loss(batch)
        self.log("val_loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def generate(
        self, prompt: bytes, length: int = 200, temperature: float = 0.8, seed: int = 0
    ) -> bytes:
        """``prompt`` followed by ``length`` sampled bytes (a fixed ``seed``: the same text for
        the same weights). ``temperature`` 0 picks the likeliest byte every time."""
        was_training = self.training
        self.eval()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        device = next(self.parameters()).device
        out = list(prompt) or [10]
        for _ in range(length):
            x = torch.tensor([out[-self.block_size :]], dtype=torch.long, device=device)
            logits = self(x)[0, -1].float().cpu()
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            out.append(nxt)
        self.train(was_training)
        return bytes(out)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
