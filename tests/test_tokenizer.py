"""The tokenizer is CLIP's real BPE, rebuilt offline from the shipped vocabulary."""

from sdaot.runtime.tokenizer import clip_tokenizer


def test_known_prompt_gives_clip_token_ids():
    ids = clip_tokenizer()("a photo of an astronaut riding a horse on mars").input_ids
    # The ids OpenAI's CLIP tokenizer gives this prompt (start, 10 words, end).
    assert ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]


def test_vocabulary_size_and_padding():
    tok = clip_tokenizer(pad_token="!")
    assert len(tok) == 49408
    padded = tok("a red cube", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tok.convert_tokens_to_ids("!")
    long = tok("word " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == 49407
