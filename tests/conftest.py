"""Shared pytest setup for the adala test suite."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same RNG state, so random models and inputs are reproducible."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Small demo splits as real tar shards (3 pretraining shards, so shard shuffling is exercised)."""
    from adala.data import demo_data

    directory = tmp_path_factory.mktemp("shards")
    return demo_data.ensure_demo_shards(directory, {"pretrain": 384, "finetune": 128, "val": 96}, per_shard=128)


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised softmax demo ViT, saved as an adala export: a stand-in for pretrained weights."""
    from adala.models import attention_config, build_vfm, save_export

    torch.manual_seed(1)
    model = build_vfm("demo_tiny")
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_export(model.state_dict(), path, {"model": "demo_tiny", "img_size": 32, "attention": attention_config(model)})
    return str(path)
