"""Prompts as 77-token chunks with a weight per token, and the weights applied, as AUTOMATIC1111 does.

CLIP reads 77 tokens. A1111 reads prompts of any length by cutting the weighted tokens into chunks of 75, each
framed by BOS and EOS and padded, encoding every chunk on its own and joining the hidden states along the
sequence axis; the UNet's cross-attention takes any number of tokens. Keeping A1111's cuts (BREAK, and its
default of moving up to 20 tokens after the last comma into the next chunk rather than splitting a phrase)
makes the same prompt give the same conditioning as there. Each chunk is one fixed (1, 77) call of the text
encoder, so compiled text encoders run unchanged.

A prompt without syntax and within 75 tokens gives the very token ids of the plain path (BOS, tokens, EOS,
padding) and all weights 1, which the pipeline leaves unapplied: its conditioning is bit for bit what it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from transformers import CLIPTokenizer

from .prompt_syntax import BREAK_PIECE, parse_attention
from .tokenizer import MAX_LENGTH, clip_tokenizer

CHUNK_TOKENS = MAX_LENGTH - 2
"""Prompt tokens per chunk: CLIP's 77 less BOS and EOS."""
COMMA_BACKTRACK = 20
"""A1111's default `comma_padding_backtrack`: a chunk that fills up within this many tokens after a comma ends
at the comma, and the tokens after it open the next chunk."""


@dataclass(frozen=True)
class PromptChunk:
    """One text-encoder call: 77 token ids and the weight of each token's hidden state."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def weighted(self) -> bool:
        """Whether any token has a weight other than 1 (else the hidden states are used as they come)."""
        return any(w != 1.0 for w in self.weights)


def plain_chunk(tokenizer: CLIPTokenizer, text: str) -> PromptChunk:
    """The prompt read as plain text (`prompt_syntax: plain`), cut at 77 tokens as diffusers does."""
    ids = tokenizer([text], padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids[0]
    return PromptChunk(tuple(ids), (1.0,) * MAX_LENGTH)


def prompt_chunks(tokenizer: CLIPTokenizer, text: str) -> list[PromptChunk]:
    """The prompt in A1111's syntax as chunks (at least one); raises ValueError for a malformed emphasis."""
    pieces = parse_attention(text)
    words = [piece for piece in pieces if piece != BREAK_PIECE]
    encoded = iter(tokenizer([t for t, _ in words], add_special_tokens=False, verbose=False).input_ids
                   if words else [])
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close(keep: int | None = None) -> None:
        """End the current chunk (after its first `keep` tokens; the rest open the next one)."""
        nonlocal tokens, weights, last_comma
        cut = len(tokens) if keep is None else keep
        chunks.append(_framed(tokenizer, tokens[:cut], weights[:cut]))
        tokens, weights, last_comma = tokens[cut:], weights[cut:], -1

    for piece in pieces:
        if piece == BREAK_PIECE:
            close()
            continue
        weight = piece[1]
        for token in next(encoded):
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                close(keep=last_comma + 1)
            if len(tokens) == CHUNK_TOKENS:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return chunks


def _framed(tokenizer: CLIPTokenizer, tokens: list[int], weights: list[float]) -> PromptChunk:
    """BOS, the tokens, EOS, then the tokenizer's padding to 77, as its own `padding="max_length"` lays them."""
    pad = MAX_LENGTH - 2 - len(tokens)
    ids = (tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * pad)
    return PromptChunk(ids, (1.0, *weights, 1.0, *[1.0] * pad))


def padded(tokenizer: CLIPTokenizer, chunks: list[PromptChunk], count: int) -> list[PromptChunk]:
    """The chunks made up to `count` with empty-prompt chunks, so that the prompt and the negative prompt (and
    SDXL's two encoders) give hidden states of one length, as A1111 pads the shorter of them."""
    return chunks + [_framed(tokenizer, [], [])] * (count - len(chunks))


def emphasized(hidden: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """A chunk's hidden states (1, 77, width) with each token's scaled by its weight, then the whole rescaled to
    its original mean: A1111's emphasis, which makes a weight shift attention between tokens rather than the
    overall scale of the conditioning."""
    original = hidden.mean()
    scaled = hidden * torch.tensor(weights, dtype=hidden.dtype, device=hidden.device).reshape(1, -1, 1)
    return scaled * (original / scaled.mean())


@cache
def _counting_tokenizer() -> CLIPTokenizer:
    return clip_tokenizer()


def chunk_count(text: str) -> int:
    """How many chunks the prompt takes, counted without any model's weights (every Stable Diffusion tokenizer
    has CLIP's vocabulary, shipped here), so that a plan can say it before the model is at hand."""
    return len(prompt_chunks(_counting_tokenizer(), text))
