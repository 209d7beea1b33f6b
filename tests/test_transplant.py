"""transplant / unfreeze: the fine-tuning workflow on real small models, checked against torch itself."""

from __future__ import annotations

import copy
import doctest
import json
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptsurgeon
from ckptsurgeon import (
    ConflictError,
    ContainerError,
    SelectionError,
    TransplantReport,
    select_keys,
    transplant,
    unfreeze,
)
from sample_models.models import SmallCNN, TiedLM, TransferCNN

BACKBONE_PARAMS = [
    "conv1.weight",
    "conv1.bias",
    "bn1.weight",
    "bn1.bias",
    "conv2.weight",
    "conv2.bias",
    "bn2.weight",
    "bn2.bias",
    "conv1x1.weight",
    "bn3.weight",
    "bn3.bias",
]
BN_STATS = [f"bn{i}.{s}" for i in (1, 2, 3) for s in ("running_mean", "running_var", "num_batches_tracked")]


def train_steps(
    model: nn.Module, params: Any, num_classes: int, steps: int = 3, seed: int = 0
) -> torch.optim.Optimizer:
    """A few SGD steps in train() mode on synthetic images."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        y = torch.randint(0, num_classes, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def trained_source(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=10)
    train_steps(model, model.parameters(), 10, seed=seed)
    return model


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything transplant may touch: values (cloned), requires_grad, training flags, locks."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "locks": sorted(n for n, m in model.named_modules() if "train" in m.__dict__),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["grad"] == before["grad"]
    assert after["training"] == before["training"]
    assert after["locks"] == before["locks"]


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor, key: str) -> None:
    assert (a.dtype, a.shape) == (b.dtype, b.shape), key
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), key


@pytest.fixture(scope="module")
def source() -> SmallCNN:
    return trained_source()


@pytest.fixture
def bare_path(tmp_path: Path, source: SmallCNN) -> Path:
    path = tmp_path / "cnn.pt"
    torch.save(source.state_dict(), path)
    return path


@pytest.fixture
def container_path(tmp_path: Path, source: SmallCNN) -> Path:
    opt = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "train.ckpt"
    torch.save({"epoch": 7, "model_state_dict": source.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    return path


# ------------------------------------------------------------------------------ the seed workflow


@pytest.mark.parametrize("kind", ["bare", "container"])
def test_seed_workflow_backbone_stays_bit_identical_while_the_head_trains(
    kind: str, bare_path: Path, container_path: Path
) -> None:
    path = bare_path if kind == "bare" else container_path
    reference = torch.load(path, weights_only=True)
    reference = reference["model_state_dict"] if kind == "container" else reference
    torch.manual_seed(123)
    new = SmallCNN(num_classes=5)
    head_before = {k: v.detach().clone() for k, v in new.fc.state_dict().items()}

    report = transplant(new, path, exclude=["fc"])

    backbone = [k for k in reference if not k.startswith("fc.")]
    assert list(report.loaded) == backbone
    assert report.missing == ("fc.weight", "fc.bias")
    assert report.unexpected == () and report.skipped == ()
    assert list(report.frozen) == BACKBONE_PARAMS
    assert report.frozen_norm_modules == ("bn1", "bn2", "bn3")
    assert report.state_dict_key == (None if kind == "bare" else "model_state_dict")

    trainable = report.trainable_parameters(new)
    assert [id(p) for p in trainable] == [id(new.fc.weight), id(new.fc.bias)]
    opt = train_steps(new, trainable, num_classes=5, seed=1)
    assert new.training and not new.bn1.training and not new.bn3.training
    assert [id(p) for g in opt.param_groups for p in g["params"]] == [id(new.fc.weight), id(new.fc.bias)]

    after = new.state_dict()
    for key in backbone:  # parameters AND BatchNorm statistics, num_batches_tracked included
        assert_bit_identical(after[key], reference[key], key)
    for name, p in new.named_parameters():
        if name in report.frozen:
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.requires_grad, name
    assert not torch.equal(new.fc.weight, head_before["weight"])
    assert not torch.equal(new.fc.bias, head_before["bias"])


def test_without_the_norm_lock_the_running_statistics_move(bare_path: Path, source: SmallCNN) -> None:
    new = SmallCNN(num_classes=5)
    report = transplant(new, bare_path, exclude="fc", freeze_batchnorm_stats=False)
    assert report.frozen_norm_modules == ()
    train_steps(new, report.trainable_parameters(new), num_classes=5)
    assert new.bn1.training
    assert not torch.equal(new.bn1.running_mean, source.bn1.running_mean)
    assert new.bn1.num_batches_tracked.item() == source.bn1.num_batches_tracked.item() + 3
    assert torch.equal(new.conv1.weight, source.conv1.weight)  # the parameters are frozen all the same


def test_transfer_model_with_another_head_reports_missing_and_unexpected(bare_path: Path, source: SmallCNN) -> None:
    new = TransferCNN(num_classes=3)
    report = transplant(new, bare_path)
    assert report.unexpected == ("fc.weight", "fc.bias")
    assert report.missing == ("head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias")
    assert list(report.frozen) == BACKBONE_PARAMS
    assert [id(p) for p in report.trainable_parameters(new)] == [id(p) for p in new.head.parameters()]
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(new.state_dict()[key], value), key


def test_model_keeps_its_dtype_and_its_parameter_objects(bare_path: Path, source: SmallCNN) -> None:
    new = SmallCNN(num_classes=5).double()
    objects = [id(p) for p in new.parameters()]
    report = transplant(new, bare_path, exclude=["fc"])
    assert [id(p) for p in new.parameters()] == objects  # an optimizer built before still works
    assert new.conv1.weight.dtype == torch.float64
    assert torch.equal(new.conv1.weight, source.conv1.weight.double())
    assert new.bn1.num_batches_tracked.dtype == torch.int64
    assert "conv1.weight" in report.frozen


def test_freeze_false_loads_but_freezes_nothing_and_locks_nothing(bare_path: Path, source: SmallCNN) -> None:
    new = SmallCNN(num_classes=5)
    report = transplant(new, bare_path, exclude=["fc"], freeze=False)
    assert report.frozen == () and report.frozen_norm_modules == ()
    assert all(p.requires_grad for p in new.parameters())
    assert torch.equal(new.conv2.weight, source.conv2.weight)
    assert new.train().bn2.training

    locked = SmallCNN(num_classes=5)
    report = transplant(locked, bare_path, exclude=["fc"], freeze=False, freeze_batchnorm_stats=True)
    assert report.frozen == () and report.frozen_norm_modules == ("bn1", "bn2", "bn3")
    assert not locked.train().bn2.training


# ------------------------------------------------------------------------------------- patterns


class TwoConvs(nn.Module):
    """`conv1` next to `conv10`: a substring filter takes both, the CLI's rules never do."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv10 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)


@pytest.mark.parametrize(
    ("include", "exclude", "regex"),
    [
        (["conv1"], [], False),
        (["conv1*"], ["conv10"], False),
        ([r"^conv1\."], [], True),
        ([], ["conv10", "fc"], False),
        (["conv1."], [], False),
    ],
)
def test_selection_is_the_clis_select_keys(include: list[str], exclude: list[str], regex: bool) -> None:
    torch.manual_seed(0)
    src = TwoConvs()
    sd = src.state_dict()
    torch.manual_seed(1)
    new = TwoConvs()
    conv10_before = new.conv10.weight.detach().clone()

    report = transplant(new, sd, include=include, exclude=exclude, regex=regex)

    assert list(report.loaded) == select_keys(list(sd), include, exclude, regex=regex)
    if "conv10.weight" not in report.loaded:
        assert torch.equal(new.conv10.weight, conv10_before)
        assert new.conv10.weight.requires_grad
    assert torch.equal(new.conv1.weight, src.conv1.weight)


def test_plain_conv1_never_takes_conv10() -> None:
    new = TwoConvs()
    report = transplant(new, TwoConvs().state_dict(), include="conv1")
    assert report.loaded == ("conv1.weight", "conv1.bias")
    assert report.frozen == ("conv1.weight", "conv1.bias")
    assert new.conv10.weight.requires_grad and new.conv10.bias.requires_grad


def test_nothing_selected_raises_and_leaves_the_model_alone(source: SmallCNN) -> None:
    new = SmallCNN(num_classes=10)
    before = snapshot(new)
    with pytest.raises(SelectionError, match=r"nothing selected.*'nope'"):
        transplant(new, source.state_dict(), include=["nope"])
    assert_unchanged(new, before)


# ---------------------------------------------------------------------------------------- rename


class Wrapped(nn.Module):
    """A SmallCNN backbone under `backbone.` with its own head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = SmallCNN(num_classes=10)
        self.head = nn.Linear(10, 2)


@pytest.mark.parametrize("strip", ["module.", ["model.", "module."]])
def test_renamed_transplant_strips_module_and_adds_backbone(tmp_path: Path, source: SmallCNN, strip: Any) -> None:
    dp = nn.DataParallel(source)  # the classic `module.` prefix, with its _metadata
    path = tmp_path / "dp.pt"
    torch.save(dp.state_dict(), path)
    new = Wrapped()

    report = transplant(new, path, strip_prefix=strip, add_prefix="backbone.")

    assert list(report.loaded) == [f"backbone.{k}" for k in source.state_dict()]
    assert report.missing == ("head.weight", "head.bias")
    assert report.frozen_norm_modules == ("backbone.bn1", "backbone.bn2", "backbone.bn3")
    for key, value in source.state_dict().items():
        assert torch.equal(new.backbone.state_dict()[key], value), key


def test_without_the_rename_nothing_matches_and_the_error_suggests_it(tmp_path: Path, source: SmallCNN) -> None:
    sd = OrderedDict((f"module.{k}", v) for k, v in source.state_dict().items())
    new = SmallCNN(num_classes=10)
    before = snapshot(new)
    with pytest.raises(SelectionError, match=r"nothing to load: none of the 22 selected.*strip_prefix.*module\."):
        transplant(new, sd)
    assert_unchanged(new, before)


def test_metadata_versions_reach_batchnorm(source: SmallCNN) -> None:
    # version 2 (today's BatchNorm): a missing num_batches_tracked is missing, bn1 not fully loaded
    new = SmallCNN(num_classes=10)
    report = transplant(new, source.state_dict(), exclude=["bn1.num_batches_tracked"])
    assert "bn1.num_batches_tracked" in report.missing
    assert report.frozen_norm_modules == ("bn2", "bn3")

    # version 1 (an old checkpoint without the buffer): BatchNorm fills it in; nothing is missing
    old = source.state_dict()
    for i in (1, 2, 3):
        del old[f"bn{i}.num_batches_tracked"]
        old._metadata[f"bn{i}"]["version"] = 1
    new = SmallCNN(num_classes=10)
    new.bn1.num_batches_tracked.fill_(9)
    report = transplant(new, old)
    assert report.missing == ()
    assert report.frozen_norm_modules == ("bn1", "bn2", "bn3")
    assert new.bn1.num_batches_tracked.item() == 9  # torch's own rule: keep the model's value
    assert list(old) == [k for k in source.state_dict() if "num_batches" not in k]  # input not mutated
    assert old._metadata["bn1"] == {"version": 1}


# ---------------------------------------------------------------------------------------- shapes


def test_shape_mismatch_refused_naming_keys_and_shapes_model_unchanged(bare_path: Path) -> None:
    new = SmallCNN(num_classes=5)
    before = snapshot(new)
    with pytest.raises(ConflictError) as info:
        transplant(new, bare_path)
    message = str(info.value)
    assert str(bare_path) in message
    assert "'fc.bias' checkpoint (10,) vs model (5,); 'fc.weight' checkpoint (10, 32) vs model (5, 32)" in message
    assert "strict_shapes=False" in message
    assert_unchanged(new, before)
    # torch itself would have refused too, even with strict=False
    with pytest.raises(RuntimeError, match="size mismatch"):
        SmallCNN(num_classes=5).load_state_dict(torch.load(bare_path, weights_only=True), strict=False)


def test_shape_mismatch_skipped_on_request(bare_path: Path, source: SmallCNN) -> None:
    new = SmallCNN(num_classes=5)
    fc_before = new.fc.weight.detach().clone()
    report = transplant(new, bare_path, strict_shapes=False)
    assert report.skipped == (("fc.weight", (10, 32), (5, 32)), ("fc.bias", (10,), (5,)))
    assert report.missing == ("fc.weight", "fc.bias")
    assert "fc.weight" not in report.loaded and "fc.weight" not in report.frozen
    assert torch.equal(new.fc.weight, fc_before) and new.fc.weight.requires_grad
    assert torch.equal(new.bn3.running_var, source.bn3.running_var)
    assert report.to_dict()["skipped"][0] == {"key": "fc.weight", "checkpoint": [10, 32], "model": [5, 32]}


def test_everything_skipped_is_nothing_to_load(source: SmallCNN) -> None:
    new = SmallCNN(num_classes=5)
    before = snapshot(new)
    with pytest.raises(SelectionError, match="nothing to load: all 2 selected key"):
        transplant(new, source.state_dict(), include="fc", strict_shapes=False)
    assert_unchanged(new, before)


# ------------------------------------------------------------------------------ checkpoint forms


def test_path_container_and_memory_load_the_same(bare_path: Path, container_path: Path, source: SmallCNN) -> None:
    container = torch.load(container_path, weights_only=True)
    forms: list[tuple[Any, dict[str, Any], str | None]] = [
        (bare_path, {}, None),
        (str(container_path), {}, "model_state_dict"),
        (container_path, {"key": "model_state_dict"}, "model_state_dict"),
        (source.state_dict(), {}, None),
        (container, {}, "model_state_dict"),
        (ckptsurgeon.load_checkpoint(container_path), {}, "model_state_dict"),
    ]
    for checkpoint, kwargs, where in forms:
        new = SmallCNN(num_classes=10)
        report = transplant(new, checkpoint, **kwargs)
        assert report.state_dict_key == where
        assert report.loaded == tuple(source.state_dict())
        for key, value in new.state_dict().items():
            assert torch.equal(value, source.state_dict()[key]), key


def test_ambiguous_container_needs_key(source: SmallCNN) -> None:
    both = {"student": source.state_dict(), "teacher": SmallCNN(num_classes=10).state_dict()}
    new = SmallCNN(num_classes=10)
    before = snapshot(new)
    with pytest.raises(ContainerError, match="ambiguous"):
        transplant(new, both)
    assert_unchanged(new, before)
    report = transplant(new, both, key="teacher")
    assert report.state_dict_key == "teacher"
    assert torch.equal(new.conv1.weight, both["teacher"]["conv1.weight"])


# ------------------------------------------------------------------------------------------ tied


def test_tied_weights_loaded_and_frozen_once_under_the_checkpoints_names() -> None:
    torch.manual_seed(5)
    src = TiedLM()
    torch.manual_seed(6)
    new = TiedLM()
    report = transplant(new, src.state_dict(), include=["embed", "head"])
    assert report.loaded == ("embed.weight", "head.weight")
    assert report.frozen == ("embed.weight", "head.weight")
    assert new.head.weight is new.embed.weight  # still one parameter
    assert torch.equal(new.embed.weight, src.embed.weight)
    trainable = report.trainable_parameters(new)
    assert all(p is not new.embed.weight for p in trainable)
    assert len(trainable) == len([n for n, p in new.named_parameters() if not n.startswith("embed")])


def test_tied_weight_under_one_name_is_not_reported_missing() -> None:
    torch.manual_seed(5)
    src = TiedLM()
    dedup = OrderedDict((k, v) for k, v in src.state_dict().items() if k != "head.weight")  # as safetensors saves it
    new = TiedLM()
    report = transplant(new, dedup)
    assert "head.weight" not in report.missing and report.missing == ()
    assert report.frozen == tuple(k for k in dedup if k in dict(new.named_parameters()))
    assert not new.head.weight.requires_grad
    assert torch.equal(new.head.weight, src.embed.weight)


def test_tied_weight_with_two_different_values_is_a_conflict() -> None:
    torch.manual_seed(5)
    untied = OrderedDict((k, v.clone()) for k, v in TiedLM().state_dict().items())
    untied["head.weight"] += 1
    new = TiedLM()
    before = snapshot(new)
    with pytest.raises(ConflictError, match=r"'embed.weight', 'head.weight'.*tied"):
        transplant(new, untied)
    assert_unchanged(new, before)


# -------------------------------------------------------------------------------------- unfreeze


def test_gradual_unfreezing(bare_path: Path) -> None:
    new = SmallCNN(num_classes=5)
    report = transplant(new, bare_path, exclude=["fc"])

    assert unfreeze(new, "bn3") == ["bn3.weight", "bn3.bias"]
    assert new.train().bn3.training and not new.bn2.training  # bn3 released, bn2 still locked
    assert unfreeze(new, ["conv1"]) == ["conv1.weight", "conv1.bias"]
    assert not new.conv1x1.weight.requires_grad
    assert unfreeze(new, "conv1") == []  # already trainable
    names = {id(p): n for n, p in new.named_parameters()}
    assert [names[id(p)] for p in report.trainable_parameters(new)] == [  # never stale
        "conv1.weight",
        "conv1.bias",
        "bn3.weight",
        "bn3.bias",
        "fc.weight",
        "fc.bias",
    ]
    with pytest.raises(SelectionError, match="no parameter matches"):
        unfreeze(new, "nope")

    rest = unfreeze(new)
    assert rest == [n for n in BACKBONE_PARAMS if not n.startswith(("conv1.", "bn3."))]
    assert all(p.requires_grad for p in new.parameters())
    new.eval()
    assert not any(m.training for m in new.modules())
    new.train()
    assert all(m.training for m in new.modules())
    assert not any("train" in m.__dict__ for m in new.modules())


def test_unfreeze_keeps_the_lock_while_a_norm_parameter_stays_frozen(bare_path: Path) -> None:
    new = SmallCNN(num_classes=5)
    transplant(new, bare_path, exclude=["fc"])
    assert unfreeze(new, "bn1.weight") == ["bn1.weight"]
    assert not new.train().bn1.training
    assert unfreeze(new, "bn1.bias") == ["bn1.bias"]
    assert new.train().bn1.training


def test_unfreeze_tied_parameter_under_both_names() -> None:
    new = TiedLM()
    transplant(new, TiedLM().state_dict())
    assert unfreeze(new, ["head"]) == ["head.weight"]
    assert new.embed.weight.requires_grad  # the same object


# -------------------------------------------------------------------------------- lock robustness


def test_the_norm_lock_survives_deepcopy_and_pickle_and_eval(bare_path: Path, source: SmallCNN) -> None:
    new = SmallCNN(num_classes=5)
    transplant(new, bare_path, exclude=["fc"])
    twin = copy.deepcopy(new)
    twin.train()
    assert twin.training and not twin.bn1.training
    twin.bn1.train()
    assert not twin.bn1.training
    assert twin.bn1.__dict__["train"].module is twin.bn1  # not the original's module
    revived = pickle.loads(pickle.dumps(new))
    assert not revived.train().bn2.training
    new.eval().train()
    train_steps(twin, [twin.fc.weight], num_classes=5)
    assert torch.equal(twin.bn2.running_mean, source.bn2.running_mean)
    with pytest.raises(ValueError, match="boolean"):
        new.bn1.train("yes")  # torch's own check still runs


# ------------------------------------------------------------------------------------- plumbing


def test_report_to_dict_is_json(bare_path: Path) -> None:
    report = transplant(SmallCNN(num_classes=5), bare_path, exclude=["fc"])
    assert isinstance(report, TransplantReport)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["loaded"] == list(report.loaded)
    assert data["frozen_norm_modules"] == ["bn1", "bn2", "bn3"]
    assert data["state_dict_key"] is None
    with pytest.raises(AttributeError):
        report.loaded = ()  # type: ignore[misc]


def test_importing_the_package_still_imports_no_torch() -> None:
    code = "import sys, ckptsurgeon; ckptsurgeon.transplant; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_docstring_examples_run() -> None:
    import ckptsurgeon.transfer

    result = doctest.testmod(ckptsurgeon.transfer)
    assert result.attempted >= 10 and result.failed == 0


def test_trainable_parameters_needs_no_argument_and_keeps_no_model_alive(bare_path: Path) -> None:
    """`report.trainable_parameters()` goes straight to an optimizer; the report only holds a weak
    reference, so it never keeps a model (and its weights) alive."""
    import gc
    import weakref

    from ckptsurgeon.errors import UsageError

    new = TransferCNN(num_classes=3)
    report = transplant(new, bare_path)
    no_arg = report.trainable_parameters()
    assert [id(p) for p in no_arg] == [id(p) for p in new.head.parameters()]
    assert [id(p) for p in report.trainable_parameters(new)] == [id(p) for p in no_arg]
    unfreeze(new, include="bn3")
    assert {id(p) for p in new.bn3.parameters()} <= {id(p) for p in report.trainable_parameters()}
    ref = weakref.ref(new)
    del new, no_arg
    gc.collect()
    assert ref() is None
    with pytest.raises(UsageError, match="no longer exists"):
        report.trainable_parameters()
