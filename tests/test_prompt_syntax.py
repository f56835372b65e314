"""A1111 prompt syntax: emphasis, BREAK, long prompts in 75-token chunks, <lora:...> tags, on SD1.5 and SDXL."""

import pytest
import torch

from sdaot.runtime.errors import InvalidRequestError
from sdaot.runtime.loader import load_pipeline
from sdaot.runtime.prompt_chunks import chunk_count, emphasized, plain_chunk, prompt_chunks
from sdaot.runtime.prompt_syntax import BREAK_PIECE, lora_tags, parse_attention
from sdaot.runtime.request import parse_request
from sdaot.runtime.tokenizer import clip_tokenizer

LONG = "a photo of a " + "very " * 90 + "red cube on a table"  # 100 tokens: two chunks


def request(model="SD1.5", **kw):
    return parse_request(dict(model_name=model, prompt="a red cube", height=64, width=64, steps=2, seed=3) | kw)


# A1111's own examples (its parse_prompt_attention docstring) and a few more of its rules.
@pytest.mark.parametrize(("text", "want"), [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("((word))", [("word", 1.2100000000000002)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(a [b] c:0.5)", [("a ", 0.5), ("b", 0.5 / 1.1), (" c", 0.5)]),
    ("a \\(b\\) \\[c\\] d\\\\e", [("a (b) [c] d\\e", 1.0)]),
    ("time: 5 o'clock", [("time: 5 o'clock", 1.0)]),
    ("word:1.3)", [("word:1.3)", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK_PIECE, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK_PIECE, ("b", 1.1)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_attention_as_a1111(text, want):
    assert parse_attention(text) == want


def test_a_factor_that_is_no_number_is_refused(pipelines):
    with pytest.raises(ValueError, match="not a number"):
        parse_attention("(word:1.2.3)")
    with pytest.raises(InvalidRequestError) as err:
        pipelines("SD1.5").plan(request(negative_prompt="(blur:1..2)"))
    assert err.value.param == "negative_prompt"


def test_lora_tags_are_cut_out_and_summed():
    text, found = lora_tags("a <lora:Pixel_Art:0.5> cube<lora:logo>, <lora:logo: 0.25 >")
    assert text == "a  cube, " and found == {"Pixel_Art": 0.5, "logo": 1.25}
    for bad in ("<lora:x:1:2>", "<lora::1>", "<lora:x:big>"):
        with pytest.raises(ValueError, match="LoRA tag"):
            lora_tags(bad)


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_chunks_of_75_tokens_framed_and_padded():
    tok = clip_tokenizer()
    assert len(ids(tok, "cat " * 75)) == 75
    assert [c.ids for c in prompt_chunks(tok, "cat " * 75)] == [plain_chunk(tok, "cat " * 75).ids]
    chunks = prompt_chunks(tok, "cat " * 80)
    cat = ids(tok, "cat")[0]
    assert len(chunks) == 2 and all(len(c.ids) == 77 for c in chunks)
    assert chunks[0].ids == (tok.bos_token_id, *[cat] * 75, tok.eos_token_id)
    assert chunks[1].ids == (tok.bos_token_id, *[cat] * 5, tok.eos_token_id, *[tok.pad_token_id] * 70)
    assert chunk_count(LONG) == 2 and chunk_count("a red cube") == 1


def test_break_and_the_comma_backtrack_start_new_chunks():
    tok = clip_tokenizer(pad_token="!")
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    cat, dog, comma = ids(tok, "cat")[0], ids(tok, "dog")[0], ids(tok, ",")[0]
    chunks = prompt_chunks(tok, "cat BREAK dog")
    assert [c.ids for c in chunks] == [(bos, cat, eos, *[pad] * 74), (bos, dog, eos, *[pad] * 74)]
    assert len(prompt_chunks(tok, "cat BREAK BREAK dog")) == 3
    # The chunk fills 14 tokens after a comma (A1111 moves up to 20 into the next chunk): it ends at the comma.
    chunks = prompt_chunks(tok, "cat " * 60 + ", " + "dog " * 20)
    assert chunks[0].ids == (bos, *[cat] * 60, comma, eos, *[pad] * 14)
    assert chunks[1].ids == (bos, *[dog] * 20, eos, *[pad] * 55)
    # Too far from the comma: cut at 75 tokens.
    chunks = prompt_chunks(tok, "cat, " + "dog " * 80)
    assert chunks[0].ids[:3] == (bos, cat, comma) and chunks[0].ids[-2:] == (dog, eos)


def test_a_plain_prompt_is_the_plain_path_on_both_tokenizers():
    for tok in (clip_tokenizer(), clip_tokenizer(pad_token="!")):
        for text in ("a red cube on a table", "", "cat, dog: 3 o'clock"):
            (chunk,) = prompt_chunks(tok, text)
            assert chunk == plain_chunk(tok, text) and not chunk.weighted


def encoded(pipe, **kw):
    plan = pipe.plan(request(pipe.spec.name, **kw))
    return pipe.encode_prompt(pipe.start(plan)), plan


@pytest.mark.parametrize("model", ["SD1.5", "SDXL1.0-base"])
def test_plain_prompts_give_the_same_conditioning_bit_for_bit(pipelines, model):
    pipe = pipelines(model)
    for kw in (dict(prompt="a red cube on a table", negative_prompt="blurry"), dict(prompt="a red cube")):
        a1111, _ = encoded(pipe, **kw)
        plain, _ = encoded(pipe, prompt_syntax="plain", **kw)
        assert a1111.keys() == plain.keys()
        assert all(torch.equal(a1111[k], plain[k]) for k in plain), (model, kw)
    literal, _ = encoded(pipe, prompt="a (red:1.5) cube", prompt_syntax="plain")
    weighted, _ = encoded(pipe, prompt="a (red:1.5) cube")
    assert not torch.equal(literal["encoder_hidden_states"], weighted["encoder_hidden_states"])


def test_weighted_embedding_is_a1111s_hand_computed(pipelines):
    pipe = pipelines("SD1.5")
    cond, _ = encoded(pipe, prompt="a (red:1.5) [cube]", cfg_scale=1.0)
    tok = pipe.bundle.tokenizers["tokenizer"]
    a, red, cube = (ids(tok, word) for word in ("a ", "red", " cube"))
    assert len(a) == len(red) == len(cube) == 1
    tokens = [tok.bos_token_id, a[0], red[0], cube[0], tok.eos_token_id] + [tok.pad_token_id] * 72
    with torch.no_grad():
        z = pipe.bundle.text_encoders["text_encoder"](torch.tensor([tokens])).last_hidden_state
    multipliers = torch.ones(77)
    multipliers[2], multipliers[3] = 1.5, 1 / 1.1
    want = z * multipliers[None, :, None]
    want = want * (z.mean() / want.mean())
    torch.testing.assert_close(cond["encoder_hidden_states"], want, rtol=1e-5, atol=1e-5)
    assert (want - z).abs().max() > 1e-2
    torch.testing.assert_close(emphasized(z, tuple(multipliers.tolist())), want)


def test_long_prompt_end_to_end_on_sd15(pipelines):
    pipe = pipelines("SD1.5")
    cond, plan = encoded(pipe, prompt=LONG, negative_prompt="blurry")
    assert plan.prompt_chunks == 2
    hidden = cond["encoder_hidden_states"]
    assert hidden.shape == (2, 154, pipe.bundle.unet.config.cross_attention_dim)
    # The negative prompt is padded with the empty prompt's chunk.
    empty, _ = encoded(pipe, prompt="", cfg_scale=1.0)
    torch.testing.assert_close(hidden[0, 77:], empty["encoder_hidden_states"][0])
    # Cut at 77 tokens, the second half of the prompt is lost; in chunks it changes the first chunk not at all.
    short, _ = encoded(pipe, prompt=LONG, negative_prompt="blurry", prompt_syntax="plain")
    torch.testing.assert_close(hidden[1, :77], short["encoder_hidden_states"][1])
    result = pipe.generate(request(prompt=LONG, negative_prompt="blurry " * 80 + "BREAK ugly"))
    assert result.images[0].size == (64, 64) and result.plan.prompt_chunks == 3


def test_long_prompt_end_to_end_on_sdxl_with_the_first_chunks_pooled_output(pipelines):
    pipe = pipelines("SDXL1.0-base")
    cond, plan = encoded(pipe, prompt=LONG, prompt_2="a cube", negative_prompt="blurry")
    assert plan.prompt_chunks == 2
    assert cond["encoder_hidden_states"].shape[:2] == (2, 154)
    tok = pipe.bundle.tokenizers["tokenizer_2"]
    first = prompt_chunks(tok, "a cube")[0]
    with torch.no_grad():
        pooled = pipe.bundle.text_encoders["text_encoder_2"](torch.tensor([first.ids])).text_embeds
    torch.testing.assert_close(cond["text_embeds"][1:], pooled)
    result = pipe.generate(request("SDXL1.0-base", prompt=LONG))
    assert result.images[0].size == (64, 64)


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime"])
def test_compiled_unets_take_77_tokens_so_long_prompts_name_the_prompt(pipelines, backend):
    pipe = pipelines("SD1.5")
    with pytest.raises(InvalidRequestError, match="2 chunks of 75 tokens") as err:
        pipe.plan(request(prompt=LONG, backend=backend))
    assert err.value.param == "prompt"
    assert pipe.plan(request(prompt=LONG, backend=backend, prompt_syntax="plain")).prompt_chunks == 1


def test_auto_runs_the_unet_on_torch_for_long_prompts(pipelines, monkeypatch):
    pipe = pipelines("SD1.5")
    asked = {}
    real = pipe.selector.select

    def select(backend, needs, extra=None):
        asked.update({name: backend for name in needs})
        return real(backend, needs, extra)

    monkeypatch.setattr(pipe.selector, "select", select)
    pipe.components(pipe.plan(request(prompt=LONG)))
    assert asked == {"text_encoder": "auto", "vae_decoder": "auto", "unet": "torch"}
    asked.clear()
    pipe.components(pipe.plan(request()))
    assert set(asked.values()) == {"auto"}


def merged_weights(pipe, plan):
    pipe.loras.apply(plan.loras)
    try:
        return {k: v.clone() for m in (pipe.bundle.unet, pipe.bundle.text_encoders["text_encoder"])
                for k, v in m.state_dict().items()}
    finally:
        pipe.loras.restore()


def test_lora_tags_merge_like_the_loras_field(lora_folder):
    pipe = load_pipeline("SD1.5", "tiny", lora_folder=lora_folder)
    tagged = pipe.plan(request(prompt="a <lora:pixel_art:0.8>red cube", negative_prompt="<lora:Logo:0.25>"))
    field = pipe.plan(request(prompt="a red cube", loras={"Pixel_Art": 0.8, "Logo": 0.25}))
    assert tagged.loras == field.loras == {"Pixel_Art": 0.8, "Logo": 0.25}
    assert (tagged.prompt, tagged.negative_prompt) == ("a red cube", "")
    want, got = merged_weights(pipe, field), merged_weights(pipe, tagged)
    assert all(torch.equal(want[k], got[k]) for k in want)
    both = pipe.plan(request(prompt="<lora:Logo:0.5>", loras={"logo": 0.25}))
    assert both.loras == {"Logo": 0.75}
    plain = pipe.plan(request(prompt="<lora:Logo:0.5>", prompt_syntax="plain"))
    assert plain.loras == {} and plain.prompt == "<lora:Logo:0.5>"


@pytest.mark.parametrize(("kw", "param"), [
    (dict(prompt="a <lora:Nope:0.5> cube"), "prompt"),
    (dict(negative_prompt="<lora:Nope>"), "negative_prompt"),
    (dict(loras={"Nope": 0.5}), "loras"),
    (dict(prompt="<lora:Logo:3>", loras={"Logo": 3.0}), "prompt"),
])
def test_unknown_or_overweight_tagged_loras_name_their_field(lora_folder, kw, param):
    pipe = load_pipeline("SD1.5", "tiny", lora_folder=lora_folder)
    with pytest.raises(InvalidRequestError, match="unknown LoRA 'Nope'|outside") as err:
        pipe.plan(request(**kw))
    assert err.value.param == param


def test_cli_prompt_syntax_flag(tmp_path):
    from click.testing import CliRunner

    from sdaot.runtime.cli import main

    def generate(*flags):
        return CliRunner().invoke(main, ["generate", "--model", "SD1.5", "--prompt", LONG, "--height", "64",
                                         "--width", "64", "--steps", "1", "-o", str(tmp_path / "o.png"), *flags])

    refused = generate("--backend", "tvm")
    assert refused.exit_code != 0 and "chunks of 75 tokens" in refused.output
    assert generate("--prompt-syntax", "plain", "--backend", "torch").exit_code == 0
