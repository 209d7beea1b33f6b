"""Shared fixtures: small trained models and checkpoints written in tmp_path."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from ckptsurgeon.cli import app
from sample_models.models import BufferNet, SmallCNN, TiedLM, TransferCNN


def trained_smallcnn(seed: int = 0, steps: int = 3) -> SmallCNN:
    """A SmallCNN after a few SGD steps on synthetic data (a fresh copy each call)."""
    return copy.deepcopy(_trained_smallcnn(seed, steps))


@functools.cache
def _trained_smallcnn(seed: int, steps: int) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8)
        y = torch.randint(0, 10, (8,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def cli(runner: CliRunner) -> Callable[..., Any]:
    """Invoke the CLI: cli("inspect", path, "--json") -> Result (stdout and stderr kept apart)."""

    def invoke(*args: Any) -> Any:
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def parse_json(result: Any) -> Any:
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def cnn_file(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.pt"
    torch.save(trained_smallcnn().state_dict(), path)
    return path


@pytest.fixture
def train_ckpt(tmp_path: Path) -> Path:
    model = trained_smallcnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "train.ckpt"
    torch.save(
        {"epoch": 5, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "loss": 0.25},
        path,
    )
    return path


@pytest.fixture
def tied_file(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    path = tmp_path / "tied.pt"
    torch.save(TiedLM().state_dict(), path)
    return path


__all__ = ["BufferNet", "SmallCNN", "TiedLM", "TransferCNN", "parse_json", "trained_smallcnn"]
