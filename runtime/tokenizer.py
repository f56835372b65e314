"""The real CLIP BPE tokenizer, built offline from the vocabulary file that ships with sdaot.

The vocabulary (`bpe_simple_vocab_16e6.txt.gz`, from the `open-clip-torch` wheel, MIT licensed) is
the same merge list OpenAI's CLIP and every Stable Diffusion tokenizer use; we turn it into the
vocab/merges pair that transformers' CLIPTokenizer expects.
"""

from __future__ import annotations

import gzip
from functools import cache
from importlib import resources

from transformers import CLIPTokenizer

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77
TEXT_ENCODER_TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
"""Each text encoder and the tokenizer that feeds it, in prompt order (`prompt` feeds the first, `prompt_2` the
second): the names diffusers gives them in a model folder."""
TEXT_ENCODERS = tuple(TEXT_ENCODER_TOKENIZERS)
_NUM_MERGES = 49152 - 256 - 2


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte, in CLIP's vocabulary order (printable bytes first)."""
    order = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    order += list(range(ord("®"), ord("ÿ") + 1))
    codes = list(order)
    for b in range(256):
        if b not in order:
            order.append(b)
            codes.append(256 + len(codes) - 188)
    return [chr(c) for c in codes]


@cache
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, ...]]]:
    raw = resources.files("sdaot.runtime.data").joinpath(VOCAB_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer (77 tokens) with the given pad token: SD1.x pads with <|endoftext|>, OpenCLIP with '!'."""
    vocab, merges = _vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tok.model_max_length = MAX_LENGTH
    return tok
