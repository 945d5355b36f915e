import dataclasses
from pathlib import Path

import pytest
import yaml

from esmm.config import Config, ConfigError, from_dict, load_config, to_dict

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


# Built-in defaults that conf/default.yaml deliberately does not spell out, and why. Every other key must be in it.
NOT_IN_DEFAULT_YAML = {
    "spark.app_name": "each job names its own Spark session; this is only the fallback name",
    "features.buckets": "per-field table over every Ali-CCP field, kept in esmm/config.py; YAML files list only the "
                        "fields they change and the rest are merged in",
    "features.max_len": "per-field table, as features.buckets",
    "train.method": "a per-run choice: --set train.method=..., or set by the experiment for each run",
    "train.sampling_rate": "a per-run choice: the experiment trains at every experiment.figure_rates entry",
    "train.aman_rate": "a per-run choice: the experiment searches experiment.aman_rates",
    "train.oversampling_k": "a per-run choice: the experiment searches experiment.oversampling_ks",
    "train.ctr_model": "a per-run path (the unit's reference CTR export); empty = <paths.runs>/ctr/model.pt",
}


def _keys(data: dict, prefix: str = "") -> set[str]:
    """Dotted keys of the config's leaves (the features tables count as leaves)."""
    out = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and prefix != "features.":
            out |= _keys(v, key + ".")
        else:
            out.add(key)
    return out


def test_default_yaml_is_the_built_in_defaults():
    """conf/default.yaml and the dataclass defaults are one set of values: same values for every key the file lists,
    and every built-in key listed in the file unless it is a deliberate exemption above."""
    built = Config()
    loaded = load_config(CONF / "default.yaml")
    differ = {f"{sec.name}.{f.name}": (getattr(getattr(loaded, sec.name), f.name),
                                       getattr(getattr(built, sec.name), f.name))
              for sec in dataclasses.fields(Config) for f in dataclasses.fields(getattr(built, sec.name))
              if getattr(getattr(loaded, sec.name), f.name) != getattr(getattr(built, sec.name), f.name)}
    assert not differ, f"conf/default.yaml (first) differs from esmm/config.py's default (second): {differ}"
    assert loaded == built == load_config(None)
    listed = _keys(yaml.safe_load((CONF / "default.yaml").read_text()))
    everything = _keys(to_dict(built))
    missing = everything - listed - set(NOT_IN_DEFAULT_YAML)
    assert not missing, f"built-in defaults missing from conf/default.yaml (add them, or exempt them here): {missing}"
    assert not set(NOT_IN_DEFAULT_YAML) - everything, "exemptions for keys that no longer exist"
    assert not set(NOT_IN_DEFAULT_YAML) & listed, "exempt keys that conf/default.yaml lists after all"


def test_evaluate_section():
    cfg = load_config(CONF / "demo.yaml", ["evaluate.models_per_pass=1", "evaluate.exports=broadcast"])
    assert (cfg.evaluate.models_per_pass, cfg.evaluate.exports) == (1, "broadcast")
    assert load_config(CONF / "default.yaml").evaluate.models_per_pass == 2


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(CONF / "demo.yaml", ["train.batch_size=4096", "etl.sampling_rates=[0.5, 1.0]",
                                           "train.sampling_rate=0.5", "experiment.figure_rates=[]",
                                           "features.max_len={'210': 5}"])
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
    ("evaluate.models_per_pass=0", "evaluate.models_per_pass: must be >= 1"),
    ("evaluate.exports=nfs", "evaluate.exports: must be one of auto|path|broadcast"),
    ("train.batch_size", "expected key=value"),
    ("train.escm2_max_weight=0.5", "train.escm2_max_weight: must be a finite number >= 1"),
    ("experiment.parallel_runs=0", "experiment.parallel_runs: must be >= 1"),
    ("train.prefetch=-1", "train.prefetch: must be >= 0"),
    ("experiment.units_per_evaluation=0", "experiment.units_per_evaluation: must be >= 1"),
    ("train.workers=2", "experiment.parallel_runs: 2 runs side by side train each run with one worker, but "
                        "train.workers is 2"),
    ("train.escm2_min_ctr=0.01", "train.escm2_min_ctr: unknown key; it was replaced by train.escm2_max_weight"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(CONF / "demo.yaml", [override])
    assert message in str(e.value)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_config_stored_by_an_earlier_version_is_upgraded():
    # exports and manifests written before the rename hold train.escm2_min_ctr, a floor of 0.01 = a clip of 100
    old = to_dict(load_config(CONF / "demo.yaml"))
    del old["train"]["escm2_max_weight"]
    old["train"]["escm2_min_ctr"] = 0.01
    assert from_dict(old).train.escm2_max_weight == pytest.approx(100.0)
    assert load_config().train.escm2_max_weight == 15.0        # the authors' clip is the default
