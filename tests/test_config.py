"""QuantizationConfig: defaults, validation messages, dtype parsing and conversion from transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import BitsAndBytesConfig

from bnb_lightning.config import QuantizationConfig, as_quantization_config, compute_dtype_for_precision


def test_defaults_are_nf4_with_double_quant():
    config = QuantizationConfig()
    assert config.bits == 4
    assert config.quant_type == "nf4"
    assert config.double_quant is True
    assert config.quant_storage is torch.uint8
    assert config.compute_dtype is None
    # The 8-bit options are unset: they would do nothing here.
    assert config.threshold is None
    assert config.has_fp16_weights is None
    assert config.skip_modules == ()
    assert config.replace_default_skips is False
    assert config.target_modules is None


def test_8bit_defaults_are_llm_int8s_without_4bit_options():
    config = QuantizationConfig(bits=8)
    assert (config.threshold, config.has_fp16_weights) == (6.0, False)
    assert (config.quant_type, config.double_quant, config.quant_storage, config.compute_dtype) == (None,) * 4


@pytest.mark.parametrize(
    ("kwargs", "field", "other"),
    [
        ({"bits": 8, "double_quant": True}, "double_quant=True", "4-bit"),
        ({"bits": 8, "double_quant": False}, "double_quant=False", "4-bit"),
        ({"bits": 8, "quant_type": "nf4"}, "quant_type='nf4'", "4-bit"),
        ({"bits": 8, "quant_storage": "bf16"}, "quant_storage='bf16'", "4-bit"),
        ({"bits": 8, "compute_dtype": "bf16"}, "compute_dtype='bf16'", "4-bit"),
        ({"threshold": 5.0}, "threshold=5.0", "8-bit"),
        ({"has_fp16_weights": False}, "has_fp16_weights=False", "8-bit"),
    ],
)
def test_an_option_of_the_other_bit_width_is_refused(kwargs, field, other):
    with pytest.raises(ValueError) as raised:
        QuantizationConfig(**kwargs)
    message = str(raised.value)
    assert f"{field} applies to {other} quantization only" in message
    assert "would do nothing" in message and f"set bits={other[0]}" in message


def test_config_is_immutable_and_hashable():
    config = QuantizationConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bits = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.skip_modules = ("lm_head",)
    assert config.bits == 4
    assert hash(QuantizationConfig(skip_modules=["a"])) == hash(QuantizationConfig(skip_modules=("a",)))


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        (" BFloat16 ", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("float32", torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_compute_dtype_names_parse(name, dtype):
    config = QuantizationConfig(compute_dtype=name)
    assert config.compute_dtype is dtype
    # Normalised once, so configs written either way compare equal.
    assert config == QuantizationConfig(compute_dtype=dtype)


@pytest.mark.parametrize(("name", "dtype"), [("bfloat16", torch.bfloat16), ("torch.uint8", torch.uint8)])
def test_quant_storage_names_parse(name, dtype):
    assert QuantizationConfig(quant_storage=name).quant_storage is dtype


def test_quant_type_is_case_insensitive():
    assert QuantizationConfig(quant_type="FP4").quant_type == "fp4"


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        ({"bits": 3}, ValueError, ["bits=3", "expected 4", "or 8"]),
        ({"bits": "4"}, ValueError, ["bits='4'", "expected 4"]),
        ({"bits": True}, ValueError, ["bits=True", "expected 4"]),
        ({"bits": 4.0}, ValueError, ["bits=4.0", "expected 4", "as an int"]),
        ({"quant_type": "nf8"}, ValueError, ["quant_type='nf8'", "'nf4' or 'fp4'"]),
        ({"quant_type": 4}, ValueError, ["quant_type=4", "'nf4' or 'fp4'"]),
        ({"compute_dtype": "float64"}, ValueError, ["compute_dtype='float64'", "bfloat16", "float16"]),
        ({"compute_dtype": "uint8"}, ValueError, ["compute_dtype=torch.uint8", "torch.bfloat16"]),
        ({"compute_dtype": torch.int8}, ValueError, ["compute_dtype=torch.int8", "torch.float32"]),
        ({"compute_dtype": 16}, TypeError, ["compute_dtype", "string or a torch.dtype", "16"]),
        ({"quant_storage": "float64"}, ValueError, ["quant_storage='float64'", "uint8"]),
        ({"bits": 8, "threshold": -1.0}, ValueError, ["threshold=-1.0", ">= 0"]),
        ({"bits": 8, "threshold": "6"}, ValueError, ["threshold='6'", ">= 0"]),
        ({"bits": 8, "threshold": float("nan")}, ValueError, ["threshold=nan", ">= 0"]),
        ({"double_quant": "yes"}, TypeError, ["double_quant", "True or False", "'yes'"]),
        ({"bits": 8, "has_fp16_weights": 1}, TypeError, ["has_fp16_weights", "True or False", "1"]),
        ({"skip_modules": [""]}, TypeError, ["skip_modules", "non-empty strings", "['']"]),
        ({"skip_modules": ["lm_head", 3]}, TypeError, ["skip_modules", "module-name patterns", "3"]),
        ({"skip_modules": 7}, TypeError, ["skip_modules", "7"]),
        ({"skip_modules": ["layers.[1"]}, ValueError, ["skip_modules", "'layers.[1'", "regular expression"]),
        ({"target_modules": []}, ValueError, ["target_modules=[]", "None"]),
        ({"target_modules": ["q_proj("]}, ValueError, ["target_modules", "'q_proj('", "regular expression"]),
        ({"replace_default_skips": True}, ValueError, ["replace_default_skips=True", "skip_modules"]),
    ],
)
def test_invalid_values_name_field_value_and_expectation(kwargs, error, fragments):
    with pytest.raises(error) as raised:
        QuantizationConfig(**kwargs)
    message = str(raised.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"


def test_patterns_are_normalised_to_tuples():
    config = QuantizationConfig(skip_modules="lm_head", target_modules=["q_proj", "v_proj"])
    assert config.skip_modules == ("lm_head",)
    assert config.target_modules == ("q_proj", "v_proj")


def test_replace_default_skips_with_skip_modules_is_accepted():
    config = QuantizationConfig(skip_modules=["lm_head"], replace_default_skips=True)
    assert config.replace_default_skips is True


def test_replace_revalidates_and_returns_a_copy():
    config = QuantizationConfig(compute_dtype="bf16")
    # Another bit width drops the options of the old one: the copy is that width's default.
    assert config.replace(bits=8) == QuantizationConfig(bits=8)
    assert config.replace(bits=8, threshold=4.0).threshold == 4.0
    assert config.replace(bits=8).replace(bits=4) == QuantizationConfig()
    assert config.replace(quant_type="fp4").compute_dtype is torch.bfloat16
    assert (config.bits, config.compute_dtype) == (4, torch.bfloat16)
    with pytest.raises(ValueError, match="double_quant=False applies to 4-bit"):
        config.replace(bits=8, double_quant=False)
    with pytest.raises(ValueError, match="bits=5"):
        config.replace(bits=5)
    with pytest.raises(ValueError, match="replace_default_skips=True"):
        config.replace(replace_default_skips=True)


def _four_bit_bnb_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
        llm_int8_skip_modules=["router", "mlp.gate"],
    )


def _eight_bit_bnb_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_8bit=True,
        llm_int8_threshold=4.5,
        llm_int8_has_fp16_weight=True,
        llm_int8_skip_modules=["score"],
    )


@pytest.mark.parametrize("as_dict", [False, True], ids=["object", "to_dict"])
def test_from_bitsandbytes_config_4bit_maps_every_field(as_dict):
    bnb_config = _four_bit_bnb_config()
    config = QuantizationConfig.from_bitsandbytes_config(bnb_config.to_dict() if as_dict else bnb_config)
    assert config == QuantizationConfig(
        bits=4,
        quant_type="nf4",
        double_quant=True,
        compute_dtype=torch.bfloat16,
        quant_storage=torch.bfloat16,
        skip_modules=("router", "mlp.gate"),
        replace_default_skips=False,
        target_modules=None,
    )


@pytest.mark.parametrize("as_dict", [False, True], ids=["object", "to_dict"])
def test_from_bitsandbytes_config_8bit_maps_every_field(as_dict):
    bnb_config = _eight_bit_bnb_config()
    config = QuantizationConfig.from_bitsandbytes_config(bnb_config.to_dict() if as_dict else bnb_config)
    assert config.bits == 8
    assert config.threshold == 4.5
    assert config.has_fp16_weights is True
    # transformers writes (and ignores) its 4-bit defaults in an 8-bit config: so do we.
    assert (config.quant_type, config.double_quant, config.compute_dtype) == (None, None, None)
    # llm_int8_skip_modules is added to the automatic skips, never a replacement for them.
    assert config.skip_modules == ("score",)
    assert config.replace_default_skips is False


@pytest.mark.parametrize("as_dict", [False, True], ids=["object", "to_dict"])
def test_from_bitsandbytes_config_keeps_transformers_defaults(as_dict):
    bnb_config = BitsAndBytesConfig(load_in_4bit=True)
    config = QuantizationConfig.from_bitsandbytes_config(bnb_config.to_dict() if as_dict else bnb_config)
    # transformers' defaults, taken as written: fp4, no double quant, float32 compute.
    assert (config.quant_type, config.double_quant) == ("fp4", False)
    assert config.compute_dtype is torch.float32
    assert config.quant_storage is torch.uint8
    assert config.skip_modules == ()


def test_from_bitsandbytes_config_without_a_load_flag_raises():
    with pytest.raises(
        ValueError, match=r"exactly one of load_in_4bit=True .* or load_in_8bit=True .*got neither"
    ):
        QuantizationConfig.from_bitsandbytes_config(BitsAndBytesConfig())


def test_from_bitsandbytes_config_with_both_load_flags_raises():
    fields = {**_four_bit_bnb_config().to_dict(), "load_in_8bit": True}
    with pytest.raises(ValueError, match="got both"):
        QuantizationConfig.from_bitsandbytes_config(fields)


def test_a_bitsandbytes_dict_without_a_load_flag_says_to_set_one():
    # Before: taken as QuantizationConfig fields, failing on the unexpected keyword 'bnb_4bit_quant_type'.
    with pytest.raises(ValueError, match="load_in_4bit=True .*got neither: set the one you want"):
        as_quantization_config({"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True})


def test_a_class_path_dict_in_python_says_to_pass_the_object():
    with pytest.raises(
        TypeError,
        match=r"class_path/init_args dict is LightningCLI's YAML form.*QuantizationConfig\(\*\*init_args\)",
    ):
        as_quantization_config({"class_path": "bnb_lightning.QuantizationConfig", "init_args": {"bits": 8}})


def test_an_unknown_field_in_a_config_dict_is_named_with_a_suggestion():
    with pytest.raises(TypeError, match="unknown fields 'quant_typ' \\(did you mean 'quant_type'\\?\\)"):
        as_quantization_config({"bits": 4, "quant_typ": "fp4"})
    assert as_quantization_config({"bits": 8, "threshold": 5}) == QuantizationConfig(bits=8, threshold=5.0)


def test_other_objects_are_refused_as_quantization_configs():
    from peft import LoraConfig

    # A PEFT config has to_dict() too: before, it was read as a BitsAndBytesConfig without load flags.
    with pytest.raises(TypeError, match="got LoraConfig"):
        as_quantization_config(LoraConfig(r=4))


def test_from_bitsandbytes_config_rejects_other_objects():
    with pytest.raises(TypeError, match="BitsAndBytesConfig or a dict, got int"):
        QuantizationConfig.from_bitsandbytes_config(4)


def test_from_bitsandbytes_config_validates_the_result():
    fields = {**_four_bit_bnb_config().to_dict(), "bnb_4bit_quant_type": "nf8"}
    with pytest.raises(ValueError, match="quant_type='nf8'"):
        QuantizationConfig.from_bitsandbytes_config(fields)


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        ("bf16-true", torch.bfloat16),
        ("bf16-mixed", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("16-true", torch.float16),
        ("16-mixed", torch.float16),
        (16, torch.float16),
        ("32-true", None),
        ("64-true", None),
        (None, None),
    ],
)
def test_compute_dtype_for_precision(precision, dtype):
    assert compute_dtype_for_precision(precision) is dtype


# -- TrainingOptions --------------------------------------------------------------------------------------


def test_training_options_defaults_and_dicts():
    from bnb_lightning import TrainingOptions
    from bnb_lightning.config import as_training_options

    options = TrainingOptions()
    assert (options.gradient_checkpointing, options.uncheckpointed_blocks, options.upcast_to_float32) == (
        None,
        0,
        False,
    )
    assert (
        options.compile_blocks,
        options.chunked_loss,
        options.dequantize_int8,
        options.fuse_4bit_dequantize,
    ) == (
        None,
        True,
        True,
        True,
    )
    assert as_training_options(None) == options
    assert as_training_options({"chunked_loss": False}) == TrainingOptions(chunked_loss=False)
    assert options.loss_kernel == "auto"
    assert as_training_options(None, loss_kernel="torch") == TrainingOptions(loss_kernel="torch")
    assert options.replace(compile_blocks=True).compile_blocks is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.chunked_loss = False


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"gradient_checkpointing": "yes"}, TypeError, "gradient_checkpointing must be True, False or None"),
        ({"compile_blocks": 1}, TypeError, "compile_blocks must be True, False or None"),
        ({"chunked_loss": None}, TypeError, "chunked_loss must be True or False, got None"),
        ({"loss_kernel": "triton"}, ValueError, "loss_kernel='triton' is not understood; expected 'auto'"),
        ({"uncheckpointed_blocks": -1}, ValueError, "uncheckpointed_blocks must be an int >= 0"),
        (
            {"uncheckpointed_blocks": 2, "gradient_checkpointing": False},
            ValueError,
            "only applies with gradient checkpointing on",
        ),
    ],
)
def test_training_options_name_the_wrong_field(fields, error, message):
    from bnb_lightning import TrainingOptions

    with pytest.raises(error, match=message):
        TrainingOptions(**fields)
