"""The music language model: embedding (or one-hot), rnnkern LSTM/GRU, dropout, linear head.

Legend: ``B`` batch, ``T`` time steps, ``V`` vocabulary size, ``E`` embedding size,
``H`` hidden size, ``L`` layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

import rnnkern

CELLS = {"lstm": rnnkern.LSTM, "gru": rnnkern.GRU}


@dataclass
class ModelConfig:
    """Shape of a :class:`MusicLM`. ``embedding_dim = 0`` means one-hot input (folk-rnn's)."""

    vocab_size: int
    embedding_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    cell: str = "lstm"
    dropout: float = 0.3

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        for name in ("vocab_size", "hidden_size", "num_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.embedding_dim, int) or self.embedding_dim < 0:
            raise ValueError(f"embedding_dim must be an integer >= 0, got {self.embedding_dim!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**data)


class MusicLM(nn.Module):
    """Next-token language model over a music vocabulary.

    ``forward(tokens[B, T], state) -> (logits[B, T, V], state)``; ``state`` is the RNN's
    (h, c) for LSTM or h for GRU, each ``[L, B, H]``, and lets generation go one step at a time.
    """

    def __init__(self, config: ModelConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        V = config.vocab_size
        if config.embedding_dim:
            self.embedding: nn.Module | None = nn.Embedding(V, config.embedding_dim)
            input_size = config.embedding_dim
        else:
            self.embedding = None
            input_size = V
        self.rnn = CELLS[config.cell](
            input_size,
            config.hidden_size,
            config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            backend=backend,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, V)

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens[B, T] (int64) -> inputs[B, T, E] (or one-hot [B, T, V])."""
        if self.embedding is not None:
            return self.embedding(tokens)
        return nn.functional.one_hot(tokens, self.config.vocab_size).to(self.head.weight.dtype)

    def forward(
        self, tokens: Tensor, state: Tensor | tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(
                f"tokens must be an int64 tensor [B, T], got {tokens.dtype} {list(tokens.shape)}"
            )
        out, state = self.rnn(self.dropout(self.embed(tokens)), state)
        return self.head(self.dropout(out)), state
