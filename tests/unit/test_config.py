"""Config: defaults, typed checks with helpful errors, overrides, long-range presets."""

import pytest
import yaml

from polarmace.config import (
    VARIANT_FLAGS,
    Config,
    ConfigError,
    LongRangeConfig,
    load_config,
    save_config,
)

FLAGS = ("charges", "dipoles", "quadrupoles", "induced_charges", "induced_dipoles")


def test_defaults_match_interfaces_and_round_trip():
    config = load_config({})
    d = config.to_dict()
    assert set(d) == {"model", "long_range", "data", "training", "output"}
    assert d["model"]["r_max"] == 5.0 and d["model"]["num_bessel"] == 8 and d["model"]["max_ell"] == 3
    assert d["model"]["hidden_irreps"] == "128x0e+128x1o" and d["model"]["radial_mlp"] == [64, 64, 64]
    assert d["model"]["e0s"] == "least_squares" and d["model"]["elements"] is None
    assert d["long_range"]["sigma"] == 1.0 and d["long_range"]["dl"] == 2.0
    assert d["long_range"]["readout_scales"] == {"charges": 0.1, "dipoles": 0.1, "quadrupoles": 0.1,
                                                 "kappa": 0.01, "alpha": 0.01}
    assert d["data"]["keys"]["bec"] == "BEC" and d["data"]["keys"]["weight"] == "config_weight"
    assert d["data"]["valid_fraction"] == 0.1 and d["data"]["seed"] == 1 and d["data"]["batch_size"] == 4
    assert d["output"]["directory"] == "runs/polarmace"
    # every flag is resolved to a bool in the stored dict
    assert all(isinstance(d["long_range"][f], bool) for f in FLAGS)
    assert Config.from_dict(d) == config
    assert load_config(None) == Config() == config
    assert yaml.safe_load(config.to_yaml()) == d


@pytest.mark.parametrize("data, bad, good", [
    ({"modle": {}}, "'modle'", "'model'"),
    ({"model": {"r_mx": 4.0}}, "'model.r_mx'", "'model.r_max'"),
    ({"data": {"keys": {"energi": "E"}}}, "'data.keys.energi'", "'data.keys.energy'"),
    ({"long_range": {"readout_scales": {"kapa": 0.1}}}, "'long_range.readout_scales.kapa'",
     "'long_range.readout_scales.kappa'"),
    ({"training": {"stage_two": {"start_epok": 3}}}, "'training.stage_two.start_epok'",
     "'training.stage_two.start_epoch'"),
    # a key put in the wrong section is found in the right one
    ({"training": {"r_max": 4.0}}, "'training.r_max'", "'model.r_max'"),
    ({"r_max": 4.0}, "'r_max'", "'model.r_max'"),
])
def test_unknown_keys_are_named_with_a_suggestion(data, bad, good):
    with pytest.raises(ConfigError) as info:
        load_config(data)
    message = str(info.value)
    assert f"unknown key {bad}" in message
    assert f"did you mean {good}?" in message


@pytest.mark.parametrize("data, key, expected", [
    ({"model": {"r_max": "abc"}}, "model.r_max", "a number"),
    ({"model": {"r_max": [5]}}, "model.r_max", "a number"),
    ({"model": {"num_interactions": 1.5}}, "model.num_interactions", "an integer"),
    ({"model": {"num_bessel": True}}, "model.num_bessel", "an integer"),
    ({"model": {"scale_shift": "yes"}}, "model.scale_shift", "a boolean"),
    ({"model": {"radial_mlp": [64, "x"]}}, "model.radial_mlp[1]", "an integer"),
    ({"model": {"elements": "H"}}, "model.elements", "a list of strings or null"),
    ({"model": {"dtype": "float16"}}, "model.dtype", "one of 'float64', 'float32'"),
    ({"model": {"e0s": "median"}}, "model.e0s", "'least_squares'"),
    ({"long_range": {"variant": "uQQ"}}, "long_range.variant", "one of 'sr'"),
    ({"data": {"keys": {"energy": 3}}}, "data.keys.energy", "a string"),
    ({"data": {"keys": "energy"}}, "data.keys", "a mapping"),
    ({"training": {"lr": "fast"}}, "training.lr", "a number"),
])
def test_wrong_types_name_the_key_and_the_expected_type(data, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert f"'{key}'" in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize("data, key", [
    ({"model": {"r_max": -1.0}}, "model.r_max"),
    ({"model": {"elements": ["H", "Qq"]}}, "model.elements"),
    ({"model": {"e0s": {"H": -13.6, "Zz": 1.0}}}, "model.e0s.Zz"),
    ({"model": {"hidden_irreps": "128 scalars"}}, "model.hidden_irreps"),
    ({"long_range": {"sigma": 0.0}}, "long_range.sigma"),
    ({"data": {"valid_fraction": 0.6, "test_fraction": 0.5}}, "data.test_fraction"),
    ({"data": {"required_labels": ["force"]}}, "data.required_labels"),
    ({"training": {"stage_two": {"start_epoch": 10, "start_fraction": 0.5}}}, "training.stage_two.start_fraction"),
    ({"training": {"ema_decay": 1.5}}, "training.ema_decay"),
    ({"output": {"name": "a/b"}}, "output.name"),
])
def test_bad_values_are_named(data, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(data)


def test_misspelled_required_label_is_suggested():
    with pytest.raises(ConfigError, match="did you mean 'forces'"):
        load_config({"data": {"required_labels": ["force"]}})


def test_valid_nested_values():
    config = load_config({"model": {"e0s": {"H": -13.6, "O": -432.0}, "elements": ["H", "O"],
                                    "r_max": 4}})  # an int is a valid float
    assert config.model.e0s == {"H": -13.6, "O": -432.0}
    assert config.model.r_max == 4.0 and isinstance(config.model.r_max, float)
    assert config.model.elements == ["H", "O"]


@pytest.mark.parametrize("variant", list(VARIANT_FLAGS))
def test_variant_presets(variant):
    lr = load_config({"long_range": {"variant": variant}}).long_range
    expected = {
        "sr": set(), "les": {"charges"}, "u": {"charges", "dipoles"}, "uQ": {"charges", "dipoles", "quadrupoles"},
        "uiq": {"charges", "induced_charges"}, "uiu": {"charges", "induced_dipoles"},
        "uQiqiu": set(FLAGS), "custom": set(),
    }[variant]
    assert {f for f in FLAGS if getattr(lr, f)} == expected
    assert lr.enabled == bool(expected)


def test_explicit_flags_override_the_preset_and_are_written_back():
    config = load_config({"long_range": {"variant": "u", "charges": False, "quadrupoles": True}})
    d = config.to_dict()["long_range"]
    assert d["variant"] == "u"
    assert (d["charges"], d["dipoles"], d["quadrupoles"], d["induced_charges"], d["induced_dipoles"]) == \
        (False, True, True, False, False)
    assert Config.from_dict(config.to_dict()).long_range == config.long_range
    custom = load_config({"long_range": {"variant": "custom", "induced_dipoles": True}}).long_range
    assert custom.induced_dipoles and not custom.charges
    assert LongRangeConfig(variant="uiq").induced_charges is True


def test_overrides_use_dotted_paths_and_yaml_values():
    config = load_config({"model": {"r_max": 5.5}}, [
        "model.r_max=4.5", "training.lr=1e-3", "model.radial_mlp=[32, 32]", "long_range.variant=uQ",
        "model.elements=[Na, Cl]", "data.max_atoms_per_batch=200", "long_range.readout_scales.kappa=0.05",
        "output.name=nacl", "training.stage_two.start_fraction=0.67", "data.keys.bec=REF_BEC",
    ])
    assert config.model.r_max == 4.5
    assert config.training.lr == pytest.approx(1e-3)  # PyYAML reads 1e-3 as a string; it is accepted
    assert config.model.radial_mlp == [32, 32]
    assert config.long_range.quadrupoles and config.long_range.dipoles
    assert config.model.elements == ["Na", "Cl"]
    assert config.data.max_atoms_per_batch == 200
    assert config.long_range.readout_scales.kappa == 0.05
    assert config.output.directory == "runs/nacl"
    assert config.training.stage_two.resolve_start(100) == 67
    assert config.data.keys.bec == "REF_BEC"
    assert load_config({}, ["model.elements=null"]).model.elements is None


@pytest.mark.parametrize("override, match", [
    ("training.lr", "key=value"),
    ("model.r_mx=4", "did you mean 'model.r_max'"),
    ("model.r_max.x=4", "'model.r_max' is not a section"),
    ("model.r_max=abc", "'model.r_max'"),
    ("=3", "empty key"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config({"model": {"r_max": 5.0}}, [override])


def test_yaml_file_round_trip_and_file_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  r_max: 4.5\n  hidden_irreps: 64x0e+64x1o\nlong_range:\n  variant: uiu\n"
                    "training:\n  lr: 1e-3\n  stage_two:\n    start_epoch: 30\n")
    config = load_config(path, ["training.epochs=40"])
    assert config.model.r_max == 4.5 and config.training.lr == 1e-3 and config.training.epochs == 40
    assert config.long_range.induced_dipoles and config.training.stage_two.resolve_start(40) == 30
    saved = tmp_path / "resolved.yaml"
    save_config(config, saved)
    assert load_config(saved) == config

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- model\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("model:\n")  # an empty section takes the defaults
    assert load_config(empty) == Config()


def test_stage_two_is_off_by_default():
    stage = load_config({}).training.stage_two
    assert not stage.enabled and stage.resolve_start(100) is None


@pytest.mark.parametrize("variant,expected", [("sr", 0.1), ("les", 0.1), ("u", 0.1), ("uQ", 0.1),
                                              ("uiq", 1.0), ("uiu", 1.0), ("uQiqiu", 1.0)])
def test_charge_readout_scale_default_follows_the_response(variant, expected):
    """Charges of order 1 e at init for models with a response step (else α → 0 in training)."""
    assert load_config({"long_range": {"variant": variant}}).long_range.readout_scales.charges == expected
    explicit = {"long_range": {"variant": variant, "readout_scales": {"charges": 0.3}}}
    assert load_config(explicit).long_range.readout_scales.charges == 0.3
    custom = {"long_range": {"variant": "custom", "charges": True, "induced_dipoles": True}}
    assert load_config(custom).long_range.readout_scales.charges == 1.0
