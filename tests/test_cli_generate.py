"""`sdaot generate` end to end: files written, seeds reproducible, bad input rejected with a named field."""

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdaot.runtime.cli import main

BASE = ["generate", "--model", "SD1.5", "--weights", "tiny", "--prompt", "a red cube", "--height", "64",
        "--width", "64", "--steps", "2"]


def run_cli(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.mark.slow
def test_acceptance_command_writes_a_64px_png_reproducibly(tmp_path):
    out = tmp_path / "out.png"
    cmd = [sys.executable, "-m", "sdaot.runtime.cli", *BASE, "--seed", "7", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "seed 7" in done.stdout
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (64, 64)
        first = np.asarray(img.convert("RGB"))

    again = tmp_path / "again.png"
    assert run_cli([*BASE, "--seed", "7", "-o", str(again)]).exit_code == 0
    other = tmp_path / "other.png"
    assert run_cli([*BASE, "--seed", "8", "-o", str(other)]).exit_code == 0
    assert np.array_equal(first, np.asarray(Image.open(again).convert("RGB")))
    assert not np.array_equal(first, np.asarray(Image.open(other).convert("RGB")))


def test_jpeg_by_extension_and_one_file_per_image(tmp_path):
    result = run_cli([*BASE, "--num-images", "2", "-o", str(tmp_path / "pic.jpg")])
    assert result.exit_code == 0, result.output
    for i in range(2):
        with Image.open(tmp_path / f"pic-{i}.jpg") as img:
            assert img.format == "JPEG"


def test_img2img_from_a_file(tmp_path):
    Image.new("RGB", (80, 64), (200, 30, 30)).save(tmp_path / "in.png")
    result = run_cli(["generate", "--model", "SD1.5", "--prompt", "x", "--steps", "2", "--image",
                      str(tmp_path / "in.png"), "--strength", "0.5", "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "o.png").size == (80, 64)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--model", "SD9"], "model_name"),
        (["--sampler", "Euler z"], "sampler"),
        (["--style-preset", "Cubism"], "style_preset"),
        (["--height", "65"], "height"),
        (["--strength", "1.5"], "strength"),
        (["--steps", "0"], "steps"),
        (["--image", "/nonexistent/in.png"], "image"),
        (["-o", "out.gif"], "output"),
    ],
)
def test_invalid_input_exits_nonzero_with_one_line_naming_the_field(tmp_path, args, field):
    base = ["generate", "--model", "SD1.5", "--prompt", "x", "--height", "64", "--width", "64", "--steps", "2",
            "-o", str(tmp_path / "o.png")]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"error: {field}:" in lines[0], result.output
    assert "Traceback" not in result.output


def test_unreadable_image_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = CliRunner().invoke(main, [*BASE, "--image", str(bad), "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 2 and "error: image:" in result.output


def test_listing_commands():
    assert "SDXL-turbo" in run_cli(["models"]).output
    assert "DPM++ 2M Karras" in run_cli(["samplers"]).output
    assert "Tilt-Shift" in run_cli(["presets"]).output
