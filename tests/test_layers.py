"""The layer contracts (`lint-imports`, run by .ci/run) name the core's modules one by one: a new
core module that is in neither list would escape them. This test keeps the lists complete."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
BASE = {"__init__", "__main__", "_version", "errors"}  # below every layer (or the entry point)
LAYERS = {"cli", "engine"}  # the packages the contracts name as layers of their own


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]


def test_every_core_module_is_in_both_layer_contracts() -> None:
    package = ROOT / "ckptsurgeon"
    core = {f"ckptsurgeon.{p.stem}" for p in package.glob("*.py") if p.stem not in BASE}
    core |= {f"ckptsurgeon.{p.parent.name}" for p in package.glob("*/__init__.py") if p.parent.name not in LAYERS}
    assert "ckptsurgeon.io" in core  # a package of the core (ckptsurgeon/io/) counts as one module
    engine_rule, core_rule = _contracts()
    assert engine_rule["source_modules"] == ["ckptsurgeon.engine"]
    assert core <= set(engine_rule["forbidden_modules"]), sorted(core - set(engine_rule["forbidden_modules"]))
    assert set(core_rule["source_modules"]) == core
    assert {"ckptsurgeon.cli", "typer", "rich"} <= set(engine_rule["forbidden_modules"]) & set(
        core_rule["forbidden_modules"]
    )
