"""The registry knows the API's model names and what each one is."""

import pytest

from sdaot.runtime.errors import NotFoundError
from sdaot.runtime.registry import all_models, architectures, get_model

API_NAMES = ["SDXL1.0-base", "SD2", "SD1.5", "SSD", "SDXL-turbo", "SDXL-ControlNet", "SD1.5-ControlNet"]


def test_every_api_model_name_is_registered_with_a_family():
    names = [m.name for m in all_models(include_refiners=False)]
    assert sorted(names) == sorted(API_NAMES)
    assert get_model("SD1.5").family == "sd1"
    assert get_model("SD2").scheduler_config["prediction_type"] == "v_prediction"
    assert get_model("SDXL1.0-base").text_encoders == ["text_encoder", "text_encoder_2"]
    assert get_model("SDXL1.0-base").refiner == "SDXL1.0-refiner"
    assert get_model("SDXL1.0-refiner").requires_aesthetics_score


def test_turbo_runs_few_steps_without_guidance():
    turbo = get_model("SDXL-turbo")
    assert turbo.default_steps <= 4 and turbo.max_steps == 4
    assert turbo.default_cfg_scale <= 1.0


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(NotFoundError) as err:
        get_model("SD3")
    assert err.value.param == "model_name"
    for name in API_NAMES:
        assert name in err.value.message


def test_full_size_architectures_are_the_published_ones():
    arch = architectures()
    assert arch["unet_sd1"]["full"]["block_out_channels"] == [320, 640, 1280, 1280]
    assert arch["unet_sdxl"]["full"]["transformer_layers_per_block"] == [1, 2, 10]
    assert arch["openclip_bigg"]["full"]["hidden_size"] == 1280
    for name, sizes in arch.items():
        assert set(sizes) == {"full", "tiny"}, name
