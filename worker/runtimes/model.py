"""The built-in runtimes' model: a small decoder-only transformer language model over bytes.

The vocabulary is the 256 byte values, so text needs no tokenizer (and nothing
is downloaded): ``encode`` is UTF-8, ``decode`` undoes it (replacing a
multi-byte character cut in half). The network is the usual pre-norm GPT
shape: token and learned position embeddings, ``n_layers`` blocks of causal
self-attention (``torch.nn.functional.scaled_dot_product_attention``) and an
MLP, a final LayerNorm and an output head tied to the token embedding.

``generate`` continues one prompt; ``generate_batch`` continues several at once
in one batched forward pass per new token (prompts of different lengths are
left-padded and masked), which is what the serving runtime's dynamic batching
runs. Greedy decoding when the temperature is None or 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 256
START_TOKEN = ord("\n")  # what an empty prompt is continued from


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_seq: int = 128  # longest context the position embedding covers
    mlp_ratio: int = 4

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not a multiple of n_heads {cfg.n_heads}")
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class TinyLM(nn.Module):
    """Decoder-only transformer; ``forward(tokens)`` gives next-token logits at every position."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[batch, time, vocab]`` for ``tokens`` ``[batch, time]``.

        ``pad_mask`` (bool, ``[batch, time]``, True = a real token) marks left padding:
        positions count real tokens only and no token attends to padding.
        """
        t = tokens.shape[1]
        if t > self.cfg.max_seq:
            raise ValueError(f"sequence of {t} tokens is longer than max_seq {self.cfg.max_seq}")
        attn_mask = None
        if pad_mask is None:
            pos = torch.arange(t, device=tokens.device).unsqueeze(0)
        else:
            pos = (pad_mask.long().cumsum(dim=1) - 1).clamp(min=0)
            causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
            # [batch, 1, query, key]; every query also sees itself so a padding row is never empty
            eye = torch.eye(t, dtype=torch.bool, device=tokens.device)
            attn_mask = (causal & pad_mask[:, None, None, :]) | eye
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x, attn_mask)
        logits: torch.Tensor = self.head(self.ln_f(x))
        return logits

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    return bytes(tokens).decode("utf-8", errors="replace")


@torch.no_grad()
def generate_batch(
    model: TinyLM,
    prompts: list[str],
    max_tokens: list[int],
    temperatures: list[float | None],
    generator: torch.Generator | None = None,
) -> list[str]:
    """Continue each prompt by its ``max_tokens`` bytes, all in one batched forward per new token.

    Each sequence keeps its last ``max_seq`` tokens as context; sequences that have
    generated their tokens leave the batch. Returns only the generated text.
    """
    if not len(prompts) == len(max_tokens) == len(temperatures):
        raise ValueError("prompts, max_tokens and temperatures differ in length")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    window = model.cfg.max_seq
    seqs = [encode(p) or [START_TOKEN] for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    try:
        for _ in range(max(max_tokens, default=0)):
            live = [i for i in range(len(prompts)) if len(out[i]) < max_tokens[i]]
            if not live:
                break
            ctx = [seqs[i][-window:] for i in live]
            width = max(len(c) for c in ctx)
            tokens = torch.zeros(len(live), width, dtype=torch.long)
            mask = torch.zeros(len(live), width, dtype=torch.bool)
            for row, c in enumerate(ctx):
                tokens[row, width - len(c) :] = torch.tensor(c)
                mask[row, width - len(c) :] = True
            uniform = all(len(c) == width for c in ctx)
            logits = model(tokens.to(device), None if uniform else mask.to(device))[:, -1, :].float().cpu()
            for row, i in enumerate(live):
                temp = temperatures[i]
                if not temp:
                    nxt = int(logits[row].argmax())
                else:
                    probs = torch.softmax(logits[row] / temp, dim=-1)
                    nxt = int(torch.multinomial(probs, 1, generator=generator))
                seqs[i].append(nxt)
                out[i].append(nxt)
    finally:
        model.train(was_training)
    return [decode(o) for o in out]


def generate(
    model: TinyLM,
    prompt: str,
    max_tokens: int = 32,
    temperature: float | None = None,
    generator: torch.Generator | None = None,
) -> str:
    """The ``max_tokens`` bytes ``model`` continues ``prompt`` with (greedy when temperature is None or 0)."""
    return generate_batch(model, [prompt], [max_tokens], [temperature], generator)[0]
