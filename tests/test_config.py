from pathlib import Path

import pytest

from esmm.config import ConfigError, from_dict, load_config, to_dict

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml", "test.yaml"])
def test_shipped_configs_load_and_round_trip(name):
    cfg = load_config(CONF / name)
    assert from_dict(to_dict(cfg)) == cfg


def test_paper_defaults():
    cfg = load_config(CONF / "default.yaml")
    assert cfg.model.embedding_dim == 18 and cfg.model.hidden == (200, 80)
    assert (cfg.train.beta1, cfg.train.beta2, cfg.train.eps) == (0.9, 0.999, 1e-8)
    assert cfg.etl.sampling_rates == (0.01, 0.1, 0.2, 0.5, 1.0)
    assert cfg.experiment.repeats == 10
    assert cfg.experiment.aman_rates == (0.1, 0.2, 0.5, 1.0) and cfg.experiment.oversampling_ks == (2, 3, 5, 10)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(CONF / "demo.yaml", ["train.batch_size=4096", "etl.sampling_rates=[0.5, 1.0]",
                                           "train.sampling_rate=0.5", "features.max_len={'210': 5}"])
    assert cfg.train.batch_size == 4096 and cfg.etl.sampling_rates == (0.5, 1.0)
    assert cfg.features.max_len["210"] == 5 and cfg.features.max_len["101"] == 1   # partial table merged


@pytest.mark.parametrize("override, message", [
    ("train.bogus=1", "train.bogus: unknown key"),
    ("bogus.x=1", "bogus: unknown key"),
    ("train.batch_size=abc", "train.batch_size: expected an integer"),
    ("train.batch_size=0", "train.batch_size: must be >= 1"),
    ("train.lr=true", "train.lr: expected a number"),
    ("train.method=xgboost", "train.method: must be one of"),
    ("generate.ctr=1.5", "generate.ctr: must be in (0, 1)"),
    ("etl.sampling_rates=[0.5, 0.1, 1.0]", "etl.sampling_rates: must be strictly increasing"),
    ("etl.sampling_rates=[0.1, 0.5]", "the last rate must be 1.0"),
    ("train.sampling_rate=0.3", "train.sampling_rate: 0.3 is not one of etl.sampling_rates"),
    ("features.buckets={'999': 10}", "features.buckets: unknown field(s) ['999']"),
    ("features.buckets={'101': 1}", "features.buckets.101: must be >= 2"),
    ("train.batch_size", "expected key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(CONF / "demo.yaml", [override])
    assert message in str(e.value)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
