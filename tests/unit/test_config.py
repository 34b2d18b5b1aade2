from __future__ import annotations

from pathlib import Path

import pytest

from cellscan.core.config import Params, load_params, parse_overrides
from cellscan.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_load_into_typed_groups():
    p = load_params(REPO / "params.yaml")
    assert isinstance(p.train.epochs, int)
    assert p.data.channels in (1, 3)
    assert p.score.map in ("l2", "ssim", "l2_ssim")


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("data:\n  channels: 4\n", r"data.channels must be 1 \(grayscale\) or 3 \(RGB\), got 4"),
        ("train:\n  epochs: 0\n", "train.epochs must be between 1 and 10000, got 0"),
        ("train:\n  epochz: 3\n", "unknown key"),
        ("score:\n  map: l3\n", "score.map must be one of l2, ssim, l2_ssim"),
        ("score:\n  view_scale: 2\n", r"score.view_scale must be in \[0, 1\], got 2"),
        ("trian: {}\n", "unknown group"),
        ("train:\n  epochs: three\n", "train.epochs must be int"),
        ("train:\n  epochs: .inf\n", "train.epochs must be int, got inf"),
        ("data:\n  root:\n", "data.root must be str, got None"),  # not the folder "None"
        ("data:\n  root: [a, b]\n", "data.root must be str"),
        ("gate:\n  tolerance: true\n", "gate.tolerance must be float, got True"),  # not 1.0: an open gate
        ("train:\n  anomaly_prob: yes\n", "train.anomaly_prob must be float, got True"),
        ("base:\n  seed: -1\n", "base.seed must be between 0 and 4294967295, got -1"),
        ("base:\n  seed: 4294967296\n", "base.seed must be between 0 and 4294967295"),
    ],
)
def test_bad_params_fail_with_a_message(tmp_path, yaml_text, needle):
    f = tmp_path / "params.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=needle):
        load_params(f)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "none.yaml")


def test_an_override_that_is_not_yaml_is_named():
    with pytest.raises(ConfigError, match=r"override 'train.epochs=\[': the value is not a YAML scalar"):
        parse_overrides(["train.epochs=["])
    with pytest.raises(ConfigError, match="data.root must be str, got None"):
        Params().with_overrides(parse_overrides(["data.root="]))


def test_overrides_are_checked_again():
    p = Params().with_overrides(parse_overrides(["train.epochs=7", "score.map=ssim"]))
    assert (p.train.epochs, p.score.map) == (7, "ssim")
    with pytest.raises(ConfigError, match="model.depth"):
        p.with_overrides({"model.depth": 9})


def test_flat_names_every_param():
    flat = Params().flat()
    assert flat["base.seed"] == 42 and "score.topk" in flat


@pytest.mark.parametrize(("cron", "needle"), [
    ("0 25 * * *", r"the hour field within 0-23 \('25' is not\), got '0 25 \* \* \*'"),
    ("0 2 * *", "5 fields"),
    ("*/0 * * * *", "a step of 1 or more in the minute field"),
    ("0 2 * 13 *", "the month field within 1-12"),
    ("0 2 * * fri-sun8", "the weekday field within 0-7"),
])
def test_a_cron_schedule_prefect_would_refuse_is_refused_when_params_are_read(tmp_path, cron, needle):
    f = tmp_path / "params.yaml"
    f.write_text(f"retrain:\n  cron: '{cron}'\n")
    with pytest.raises(ConfigError, match=f"retrain.cron must be a cron expression with {needle}"):
        load_params(f)


@pytest.mark.parametrize("cron", ["0 2 * * *", "*/15 6-18 * * mon-fri", "0 0 1,15 jan-jun ?", "30 4 * * 7",
                                  "1-5/2 * * dec-jan *"])
def test_cron_schedules_prefect_takes_are_taken(tmp_path, cron):
    f = tmp_path / "params.yaml"
    f.write_text(f"retrain:\n  cron: '{cron}'\n")
    assert load_params(f).retrain.cron == cron
