"""Training text for the built-in training runtime, made here: nothing is downloaded or shipped.

``corpus()`` is about 100 KB of deterministic English-like text from a seeded
generator: short sentences from a small grammar ("the old fox sees a red
hill.") and sums ("12 plus 7 is 19."), so a byte-level model has structure to
learn within tens of steps (spelling and spacing at once, the grammar and the
sums with more training). The same seed gives the same text on every node.

``batch(data, step, rank, ...)`` draws one batch of random windows; it depends
only on (seed, step, rank), so each rank of a data-parallel job sees its own
shard of the data, and a job resumed from a checkpoint at step N sees the
batches it would have seen had it never stopped.
"""

from __future__ import annotations

import random

import torch

_DETERMINERS = ["the", "a", "one", "every", "that", "this"]
_ADJECTIVES = ["old", "red", "small", "quiet", "bright", "cold", "green", "quick", "tall", "dark", "warm"]
_NOUNS = ["fox", "dog", "river", "hill", "bird", "tree", "ship", "king", "child", "stone", "lamp", "road"]
_VERBS = ["sees", "finds", "follows", "keeps", "knows", "crosses", "carries", "leaves", "hears", "meets"]
_PLACES = ["by the sea", "in the wood", "at night", "over the hill", "near the town", "in the rain"]


def _noun_phrase(rng: random.Random) -> str:
    words = [rng.choice(_DETERMINERS)]
    if rng.random() < 0.6:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    return " ".join(words)


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.25:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"{a} plus {b} is {a + b}."
    text = f"{_noun_phrase(rng)} {rng.choice(_VERBS)} {_noun_phrase(rng)}"
    if kind < 0.5:
        text += f" {rng.choice(_PLACES)}"
    return text[0].upper() + text[1:] + "."


def corpus(size: int = 100_000, seed: int = 0) -> str:
    """About ``size`` characters of text (whole lines, four sentences each), the same for the same seed."""
    rng = random.Random(seed)
    lines: list[str] = []
    total = 0
    while total < size:
        line = " ".join(_sentence(rng) for _ in range(4))
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines) + "\n"


def corpus_tensor(size: int = 100_000, seed: int = 0) -> torch.Tensor:
    """The corpus as a 1-D tensor of byte values (int64)."""
    return torch.tensor(list(corpus(size, seed).encode("utf-8")), dtype=torch.long)


def batch(
    data: torch.Tensor, step: int, rank: int, batch_size: int, seq_len: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets ``[batch_size, seq_len]`` for (step, rank): random windows of ``data``."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    windows = data[idx]
    return windows[:, :-1], windows[:, 1:]
