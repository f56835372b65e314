"""AUTOMATIC1111's prompt syntax as text: emphasis, `BREAK` and `<lora:name:weight>` tags.

Clients written for A1111 send prompts in its syntax, and read as plain text those brackets and tags would only
add noise tokens. This module gives A1111's meaning, reimplemented from its documented behaviour (the semantics
of `prompt_parser.parse_prompt_attention`), not from its code: `(text)` multiplies the weight of its tokens by
1.1, `[text]` divides it by 1.1, `(text:1.3)` sets the factor, groups nest by multiplying, an unclosed group
still applies its factor to the end, `\\(` `\\)` `\\[` `\\]` `\\\\` are the characters themselves, and `BREAK`
(upper case, a word of its own) ends the current 75-token chunk. One deliberate difference: in A1111 a BREAK
inside brackets has its marker weight scaled and is then read as the word "BREAK"; here it still breaks.
Tokens and chunks are `prompt_chunks`' business; this module needs no tokenizer.
"""

from __future__ import annotations

import re

Piece = tuple[str, float]
"""A run of prompt text and the weight of its tokens."""

BREAK_WEIGHT = -1.0
BREAK_PIECE: Piece = ("BREAK", BREAK_WEIGHT)
"""The marker `parse_attention` puts where the prompt says BREAK (A1111's own representation)."""

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
_TOKEN = re.compile(r"""
      \\[()\[\]\\]              # an escaped bracket or backslash: the character itself
    | \\                        # any other backslash: dropped
    | [(\[]                     # a group opens
    | :\s*([+-]?[.\d]+)\s*\)    # a round group closes with its own factor
    | [)\]]                     # a group closes
    | [^\\()\[\]:]+             # text
    | :                         # a colon that closes nothing: text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_LORA_TAG = re.compile(r"<lora:([^>]*)>")


def parse_attention(text: str) -> list[Piece]:
    """The prompt as (text, weight) runs, neighbours of equal weight merged, BREAK as `BREAK_PIECE`.

    >>> parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[:2]
    [('a ', 1.0), ('house', 1.5730000000000004)]

    Raises ValueError for a factor that is not a number, such as `(word:1.2.3)`.
    """
    pieces: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if tuple(piece) != BREAK_PIECE:
                piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, factor = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif factor is not None and rounds:
            scale(rounds.pop(), _number(factor))
        elif token == ")" and rounds:
            scale(rounds.pop(), ROUND_FACTOR)
        elif token == "]" and squares:
            scale(squares.pop(), SQUARE_FACTOR)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    pieces.append(list(BREAK_PIECE))
                pieces.append([part, 1.0])
    for start in rounds:
        scale(start, ROUND_FACTOR)
    for start in squares:
        scale(start, SQUARE_FACTOR)
    merged: list[Piece] = []
    for piece_text, weight in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == weight and BREAK_PIECE not in (merged[-1], (piece_text, weight)):
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged


def _number(factor: str) -> float:
    try:
        return float(factor)
    except ValueError:
        raise ValueError(f"emphasis factor {factor!r} is not a number (write it as in (word:1.3))") from None


def lora_tags(text: str) -> tuple[str, dict[str, float]]:
    """The prompt without its `<lora:name>` / `<lora:name:weight>` tags (weight 1 when left out), and the
    weight each named LoRA gets from them: a name tagged twice gets both weights added, as A1111 applies a
    network once per tag. Raises ValueError for a tag that is not of that form."""
    found: dict[str, float] = {}

    def take(match: re.Match) -> str:
        name, *rest = (part.strip() for part in match.group(1).split(":"))
        if not name or len(rest) > 1:
            raise ValueError(f"LoRA tag {match.group(0)!r} is not <lora:name> or <lora:name:weight>")
        try:
            weight = float(rest[0]) if rest else 1.0
        except ValueError:
            raise ValueError(f"LoRA tag {match.group(0)!r}: weight {rest[0]!r} is not a number") from None
        found[name] = found.get(name, 0.0) + weight
        return ""

    return _LORA_TAG.sub(take, text), found
