"""Style presets: prompt and negative-prompt templates applied before encoding (data/style_presets.json)."""

from __future__ import annotations

from functools import cache

from .errors import InvalidRequestError
from .registry import read_data


@cache
def presets() -> dict[str, dict[str, str]]:
    """Every style preset by its canonical name."""
    return read_data("style_presets.json")["presets"]


def get_preset(name: str) -> str:
    """The canonical preset name for `name` (case-insensitive); unknown names list the valid ones."""
    folded = {k.lower(): k for k in presets()}
    if name.strip().lower() not in folded:
        raise InvalidRequestError(
            f"unknown style_preset {name!r}; valid presets: {', '.join(presets())}", param="style_preset"
        )
    return folded[name.strip().lower()]


def apply_preset(name: str | None, prompt: str, negative_prompt: str | None) -> tuple[str, str | None]:
    """Wrap the prompt in the preset's template and join its negative text with the user's negative prompt."""
    if name is None:
        return prompt, negative_prompt
    template = presets()[get_preset(name)]
    styled = template["prompt"].replace("{prompt}", prompt)
    negatives = [t for t in (template["negative_prompt"], negative_prompt) if t]
    return styled, ", ".join(negatives) if negatives else negative_prompt
