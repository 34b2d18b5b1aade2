"""Shared fixtures: a tiny synthetic dataset and a tiny trained model, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cellscan.settings import OFFLINE_ENV

for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)

from cellscan.core.config import Params  # noqa: E402
from cellscan.core.synth import generate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "datasets"


def tiny_params(**overrides: object) -> Params:
    """Small, fast params: 48x48 grayscale slices at their native size, 32-pixel crops, tiny networks, 3 epochs."""
    base = {
        "data.val_fraction": 0.25,
        "model.base_filters": 8,
        "model.depth": 2,
        "model.bottleneck": 8,
        "model.head_filters": 4,
        "model.head_depth": 2,
        "train.crop": 32,
        "train.steps_per_epoch": 4,
        "train.max_seconds": 120,
        "train.epochs": 3,
        "train.batch_size": 8,
        "train.patience": 2,
        "synth.size": 48,
        "synth.n_train": 16,
        "synth.n_test_good": 6,
        "synth.n_per_defect": 2,
    }
    return Params().with_overrides(base | dict(overrides))


@pytest.fixture(scope="session")
def params() -> Params:
    return tiny_params()


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory, params: Params) -> Path:
    root = tmp_path_factory.mktemp("data") / "cells"
    s = params.synth
    generate(root, size=s.size, n_train=s.n_train, n_test_good=s.n_test_good, n_per_defect=s.n_per_defect, seed=7)
    return root


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model") / "model"


@pytest.fixture(scope="session")
def trained(params: Params, dataset_dir: Path, model_dir: Path):  # type: ignore[no-untyped-def]
    """A tiny model trained once per session and saved to ``model_dir``."""
    from cellscan.core.train import train

    return train(params, dataset_dir, model_dir)


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED}")
    return SHARED
