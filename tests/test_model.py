"""ckptsurgeon.model: --model SPEC loading, check_model against torch's own loader, rename hints;
and the sample models / sample checkpoints they are demonstrated with."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ckptsurgeon.errors import ModelSpecError
from ckptsurgeon.model import (
    ModelReport,
    RenameSuggestion,
    ShapeMismatch,
    check_model,
    load_model,
    suggest_renames,
)
from sample_models.models import BufferNet, SmallCNN, TiedLM, TransferCNN

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_models"


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def all_meta(model: nn.Module) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return bool(tensors) and all(t.is_meta for t in tensors)


def spec_error(spec: str, kwargs=None) -> str:
    with pytest.raises(ModelSpecError) as info:
        load_model(spec, kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------------------------------------------------------
# load_model: every SPEC form


def test_module_spec_builds_on_meta_with_kwargs_as_mapping_or_json():
    default = load_model("sample_models.models:SmallCNN")
    assert type(default) is SmallCNN and all_meta(default)
    assert default.fc.weight.shape == (10, 32)
    assert load_model("sample_models.models:SmallCNN", {"num_classes": 7}).fc.weight.shape == (7, 32)
    assert load_model("sample_models.models:SmallCNN", '{"num_classes": 3}').fc.weight.shape == (3, 32)
    assert load_model("sample_models:TransferCNN", "{}").head[2].weight.shape == (5, 16)


def test_module_spec_is_imported_from_the_current_directory(tmp_path, monkeypatch):
    write(
        tmp_path / "cwd_only_models_7f3a.py",
        """
        from torch import nn
        class Net(nn.Module):
            def __init__(self, width=2):
                super().__init__()
                self.lin = nn.Linear(width, width)
    """,
    )
    monkeypatch.chdir(tmp_path)
    # like the installed console script: the working directory is not on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    model = load_model("cwd_only_models_7f3a:Net", {"width": 3})
    assert model.lin.weight.shape == (3, 3) and all_meta(model)
    assert str(tmp_path) not in sys.path and "" not in sys.path


def test_file_spec_relative_absolute_and_sibling_import(tmp_path, monkeypatch):
    write(
        tmp_path / "proj" / "layers_sibling_91c.py",
        """
        from torch import nn
        def block(n):
            return nn.Sequential(nn.Linear(n, n), nn.LayerNorm(n))
    """,
    )
    write(
        tmp_path / "proj" / "net.py",
        """
        from torch import nn
        from layers_sibling_91c import block
        class Net(nn.Module):
            def __init__(self, n=4):
                super().__init__()
                self.body = block(n)
    """,
    )
    before = list(sys.path)
    absolute = load_model(f"{tmp_path / 'proj' / 'net.py'}:Net", '{"n": 6}')
    assert absolute.body[0].weight.shape == (6, 6) and all_meta(absolute)
    monkeypatch.chdir(tmp_path)
    relative = load_model("proj/net.py:Net")
    assert relative.body[1].weight.shape == (4,)
    assert type(relative).__module__ != type(absolute).__module__  # a fresh, unique module each time
    assert sys.path == before


def test_sample_models_file_spec():
    model = load_model(f"{SAMPLES / 'models.py'}:TiedLM")
    assert model.head.weight is model.embed.weight and all_meta(model)


def test_dotted_name_and_factory_function(tmp_path):
    path = write(
        tmp_path / "nested.py",
        """
        from torch import nn
        class Outer:
            class Inner(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.w = nn.Parameter(nn.init.normal_(__import__("torch").empty(2, 5)))
        def make(depth=1):
            return nn.Sequential(*[nn.Linear(2, 2) for _ in range(depth)])
    """,
    )
    inner = load_model(f"{path}:Outer.Inner")
    assert inner.w.shape == (2, 5) and inner.w.is_meta
    made = load_model(f"{path}:make", {"depth": 3})
    assert isinstance(made, nn.Sequential) and len(made) == 3 and all_meta(made)


def test_seven_billion_parameter_model_builds_without_weight_memory(tmp_path):
    path = write(
        tmp_path / "big.py",
        """
        from torch import nn
        class Block(nn.Module):
            def __init__(self, d=4096, h=11008):
                super().__init__()
                self.attn = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(4))
                self.mlp = nn.ModuleList([nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False),
                                          nn.Linear(h, d, bias=False)])
                self.norm = nn.LayerNorm(d)
        class LM(nn.Module):
            def __init__(self, layers=32):
                super().__init__()
                self.embed = nn.Embedding(32000, 4096)
                self.layers = nn.ModuleList(Block() for _ in range(layers))
                self.lm_head = nn.Linear(4096, 32000, bias=False)
    """,
    )
    model = load_model(f"{path}:LM")
    assert sum(p.numel() for p in model.parameters()) > 6.7e9
    assert all_meta(model)  # 27 GB of float32 would not fit this machine otherwise


def test_seven_billion_build_time_and_memory_in_a_fresh_process(tmp_path):
    """The budget: well under 5 s and 1 GB; initialisers on meta must not drag in torch._dynamo."""
    script = write(
        tmp_path / "measure.py",
        """
        import resource, sys, time
        import torch
        from ckptsurgeon.model import load_model
        start = time.perf_counter()
        model = load_model(sys.argv[1] + ":LM")
        seconds = time.perf_counter() - start
        # VmHWM: this process's own peak (ru_maxrss would include pytest's, copied in at exec)
        with open("/proc/self/status") as f:
            rss_mib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
        params = sum(p.numel() for p in model.parameters())
        print(seconds, rss_mib, params, "torch._dynamo" in sys.modules)
    """,
    )
    write(
        tmp_path / "big.py",
        """
        from torch import nn
        class LM(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(32000, 4096)
                self.layers = nn.ModuleList(
                    nn.ModuleDict({"qkvo": nn.Linear(4096, 4 * 4096), "up": nn.Linear(4096, 2 * 11008),
                                   "down": nn.Linear(11008, 4096), "norm": nn.LayerNorm(4096)})
                    for _ in range(32)
                )
    """,
    )
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "big.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    seconds, rss_mib, params, dynamo = result.stdout.split()
    assert int(params) > 6.5e9
    assert float(seconds) < 2.5 and float(rss_mib) < 1024
    assert dynamo == "False"


# ------------------------------------------------------------------------------------------------
# load_model: every error


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("sample_models.models", "has no ':'"),
        (":SmallCNN", "empty module or file part"),
        ("sample_models.models:", "empty name part"),
        ("sample_models.models:SmallCNN..x", "empty name part"),
        ("no_such_package_x9.models:Net", "module 'no_such_package_x9.models' not found"),
        ("sample_models.no_such_module:Net", "module 'sample_models.no_such_module' not found"),
        ("does/not/exist.py:Net", "does/not/exist.py does not exist"),
        ("sample_models.models:SmallCN", "has no attribute 'SmallCN' (did you mean 'SmallCNN'"),
        ("sample_models.models:SmallCNN.nope", "sample_models.models:SmallCNN has no attribute 'nope'"),
        ("sample_models.models:__doc__", "names a str, not an nn.Module subclass or a callable"),
        ("collections:OrderedDict", "class OrderedDict, which is not an nn.Module subclass"),
    ],
)
def test_spec_errors(spec, expected):
    assert expected in spec_error(spec)


def test_import_errors_name_the_exception(tmp_path, monkeypatch):
    write(tmp_path / "broken_on_import_5d2.py", "raise ValueError('boom\\nsecond line')\n")
    write(tmp_path / "needs_dep_5d2.py", "import not_installed_dependency_5d2\n")
    monkeypatch.chdir(tmp_path)
    assert "importing 'broken_on_import_5d2' raised ValueError: boom second line" in spec_error(
        "broken_on_import_5d2:Net"
    )
    # a missing dependency inside an existing module is not "module not found"
    message = spec_error("needs_dep_5d2:Net")
    assert "importing 'needs_dep_5d2' raised ModuleNotFoundError" in message
    assert "not_installed_dependency_5d2" in message
    assert "raised ValueError: boom" in spec_error(f"{tmp_path / 'broken_on_import_5d2.py'}:Net")
    assert "broken_on_import_5d2" not in "".join(m for m in sys.modules if m.startswith("_ckptsurgeon"))


def test_not_a_module_results_and_constructor_errors(tmp_path):
    path = write(
        tmp_path / "odd.py",
        """
        from torch import nn
        def not_a_model():
            return [1, 2]
        instance = nn.Linear(2, 2)
        class Picky(nn.Module):
            def __init__(self, size):
                super().__init__()
                if size < 0:
                    raise ValueError(f"size must be >= 0,\\n got {size}")
                self.lin = nn.Linear(size, size)
    """,
    )
    assert "returned a list, not an nn.Module" in spec_error(f"{path}:not_a_model")
    assert "names an nn.Module instance" in spec_error(f"{path}:instance")
    assert "raised ValueError: size must be >= 0, got -1" in spec_error(f"{path}:Picky", {"size": -1})
    message = spec_error(f"{path}:Picky", '{"sise": 3}')
    assert "raised TypeError" in message and "sise" in message
    assert load_model(f"{path}:Picky", {"size": 2}).lin.weight.shape == (2, 2)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ("{num_classes: 3}", "--model-kwargs is not valid JSON"),
        ("[1, 2]", "--model-kwargs must be a JSON object"),
        ("3", "got a JSON int"),
        ({1: 2}, "keys must be strings"),
    ],
)
def test_kwargs_errors(kwargs, expected):
    assert expected in spec_error("sample_models.models:SmallCNN", kwargs)


# ------------------------------------------------------------------------------------------------
# check_model agrees with a real load_state_dict(strict=False)


def real_load(model: nn.Module, sd) -> tuple[list[str], list[str], list[str]]:
    """What torch reports loading real tensors into a real model: missing, unexpected, size errors."""
    captured = {}

    def hook(module, incompatible):
        captured["missing"] = list(incompatible.missing_keys)
        captured["unexpected"] = list(incompatible.unexpected_keys)

    handle = model.register_load_state_dict_post_hook(hook)
    try:
        model.load_state_dict(sd, strict=False)
        size_errors = []
    except RuntimeError as exc:
        size_errors = re.findall(r"size mismatch for (\S+):", str(exc))
    finally:
        handle.remove()
    return captured["missing"], captured["unexpected"], size_errors


def shapes_of(sd) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def assert_agrees(make_model, sd) -> ModelReport:
    """check_model on a meta build and on a real model equals torch's verdict on a real model."""
    missing, unexpected, size_errors = real_load(make_model(), sd)
    metadata = getattr(sd, "_metadata", None)
    with torch.device("meta"):
        meta_model = make_model()
    reports = [
        check_model(shapes_of(sd), meta_model, metadata=metadata),
        check_model(shapes_of(sd), make_model(), metadata=metadata),
    ]
    for report in reports:
        assert list(report.missing_keys) == missing
        assert list(report.unexpected_keys) == unexpected
        assert [m.key for m in report.shape_mismatches] == size_errors
        assert report.errors == ()  # size mismatches are reported as such, nothing else went wrong
        assert report.compatible() == (not missing and not unexpected and not size_errors)
        assert report.compatible(allow_missing=True, allow_unexpected=True) == (not size_errors)
    assert reports[0] == reports[1]
    return reports[0]


def trained_sd(model: nn.Module):
    torch.manual_seed(1)
    return model.state_dict()


def test_identical_checkpoint_is_compatible_and_keys_are_classified():
    report = assert_agrees(SmallCNN, trained_sd(SmallCNN()))
    assert report.compatible() and not report.suggestions
    assert report.kinds["conv1.weight"] == "parameter"
    assert report.kinds["bn1.running_mean"] == "buffer"
    assert report.kinds["bn1.num_batches_tracked"] == "buffer"
    assert report.to_dict() == {
        "compatible": True,
        "missing_keys": [],
        "unexpected_keys": [],
        "shape_mismatches": [],
        "errors": [],
        "suggestions": [],
    }


def test_missing_head_and_extra_keys():
    sd = trained_sd(SmallCNN())
    del sd["fc.weight"], sd["fc.bias"]
    sd["extra.weight"] = torch.zeros(3)
    sd["conv1.scale"] = torch.zeros(1)
    sd["bn1.nested.deeper"] = torch.zeros(1)
    report = assert_agrees(SmallCNN, sd)
    assert report.missing_keys == ("fc.weight", "fc.bias")
    assert set(report.unexpected_keys) == {"extra.weight", "conv1.scale", "bn1.nested.deeper"}
    assert report.kinds["fc.weight"] == "missing" and report.kinds["extra.weight"] == "unexpected"
    assert report.compatible(allow_missing=True, allow_unexpected=True)
    assert not report.compatible(allow_missing=True)


def test_transfer_model_from_smallcnn_checkpoint():
    report = assert_agrees(lambda: TransferCNN(num_classes=5), trained_sd(SmallCNN()))
    assert report.missing_keys == ("head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias")
    assert report.unexpected_keys == ("fc.weight", "fc.bias")


def test_dataparallel_prefix_with_its_metadata():
    sd = nn.DataParallel(SmallCNN()).state_dict()
    assert list(sd)[0] == "module.conv1.weight"
    report = assert_agrees(SmallCNN, sd)
    assert len(report.unexpected_keys) == len(sd)
    assert report.suggestions == ("ckptsurgeon rename CKPT -o OUT --strip-prefix module.",)
    assert report.renames == (RenameSuggestion("module.", None, len(sd)),)
    assert report.to_dict()["suggestions"] == list(report.suggestions)


@pytest.mark.parametrize("metadata", ["none", "version2", "version1"])
def test_batchnorm_without_num_batches_tracked(metadata):
    sd = trained_sd(SmallCNN())
    for key in [k for k in sd if k.endswith("num_batches_tracked")]:
        del sd[key]
    if metadata == "none":
        sd = OrderedDict(sd)  # a rebuilt OrderedDict drops _metadata
        assert not hasattr(sd, "_metadata")
    elif metadata == "version1":
        sd._metadata = {k: {"version": 1} for k in sd._metadata}
    report = assert_agrees(SmallCNN, sd)
    if metadata == "version2":  # a modern BatchNorm state without the counter: torch says missing
        assert report.missing_keys == tuple(f"bn{i}.num_batches_tracked" for i in (1, 2, 3))
    else:  # old or unknown version: torch fills the counter in
        assert report.missing_keys == () and report.compatible()


def test_metadata_argument_is_not_modified():
    sd = trained_sd(SmallCNN())
    before = {k: dict(v) for k, v in sd._metadata.items()}
    check_model(shapes_of(sd), SmallCNN(), metadata=sd._metadata)
    assert {k: dict(v) for k, v in sd._metadata.items()} == before


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.zeros(1))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))


@pytest.mark.parametrize(
    ("temperature", "bias", "steps", "mismatched"),
    [
        ((1,), (1,), (1,), []),  # 1-element 1-d loads into 0-d (torch 0.3 compat)
        ((), (1,), (), []),
        ((2,), (1,), (), ["temperature"]),
        ((), (), (), ["bias"]),  # the compat rule is one way only
        ((1, 1), (1,), (1,), ["temperature"]),
    ],
)
def test_zero_dim_compat_rule(temperature, bias, steps, mismatched):
    sd = {"temperature": torch.zeros(temperature), "bias": torch.zeros(bias), "steps": torch.zeros(steps)}
    report = assert_agrees(Scalar, sd)
    assert [m.key for m in report.shape_mismatches] == mismatched
    for m in report.shape_mismatches:
        assert m.checkpoint == tuple(sd[m.key].shape) and report.kinds[m.key] == "shape_mismatch"


def test_shape_mismatches_are_neither_missing_nor_unexpected():
    sd = trained_sd(SmallCNN(num_classes=10))
    report = assert_agrees(lambda: SmallCNN(num_classes=5), sd)
    assert report.shape_mismatches == (
        ShapeMismatch("fc.weight", (10, 32), (5, 32)),
        ShapeMismatch("fc.bias", (10,), (5,)),
    )
    assert report.missing_keys == () and report.unexpected_keys == ()
    assert not report.compatible(allow_missing=True, allow_unexpected=True)
    assert report.to_dict()["shape_mismatches"] == [
        {"key": "fc.weight", "checkpoint": [10, 32], "model": [5, 32]},
        {"key": "fc.bias", "checkpoint": [10], "model": [5]},
    ]


def test_non_persistent_buffer_is_neither_expected_nor_accepted():
    sd = trained_sd(BufferNet())
    assert "cache" not in sd
    assert assert_agrees(BufferNet, sd).compatible()
    sd["cache"] = torch.zeros(4)
    report = assert_agrees(BufferNet, sd)
    assert report.unexpected_keys == ("cache",) and report.kinds["scale"] == "buffer"


def test_tied_weights():
    sd = trained_sd(TiedLM())
    assert sd["embed.weight"].data_ptr() == sd["head.weight"].data_ptr()
    assert assert_agrees(TiedLM, sd).compatible()
    del sd["head.weight"]
    report = assert_agrees(TiedLM, sd)
    assert report.missing_keys == ("head.weight",)


def test_check_model_leaves_the_model_unchanged():
    model = TiedLM()
    params = {k: (p, p.detach().clone()) for k, p in model.named_parameters(remove_duplicate=False)}
    sd = trained_sd(TiedLM())
    sd["norm.weight"] = torch.zeros(99)
    check_model(shapes_of(sd), model, metadata=sd._metadata)
    assert model.head.weight is model.embed.weight
    for key, (param, value) in params.items():
        current = model.get_parameter(key)
        assert current is param and torch.equal(current, value) and not current.is_meta
    bn = BufferNet()
    buffers = dict(bn.named_buffers())
    check_model(shapes_of(trained_sd(BufferNet())), bn)
    assert all(b is buffers[k] for k, b in bn.named_buffers())


class Custom(nn.Module):
    """Refuses a checkpoint that has a `legacy` key: a module-specific check in _load_from_state_dict."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        if state_dict.get(prefix + "legacy") is not None:
            errors.append(f"{prefix}legacy is no longer supported")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def test_other_loader_errors_make_it_incompatible():
    sd = {"w": torch.ones(2), "legacy": torch.ones(1)}
    with pytest.raises(RuntimeError, match="legacy is no longer supported"):
        Custom().load_state_dict(sd, strict=False)
    report = check_model(shapes_of(sd), Custom())
    assert report.errors == ("legacy is no longer supported",)
    assert report.unexpected_keys == ("legacy",)
    assert not report.compatible(allow_missing=True, allow_unexpected=True)


# ------------------------------------------------------------------------------------------------
# suggest_renames


def test_suggest_strip_module_prefix_even_with_a_stray_key():
    model = ["conv1.weight", "conv1.bias", "fc.weight"]
    ckpt = [f"module.{k}" for k in model] + ["module.extra"]
    (best,) = suggest_renames(ckpt, model)
    assert (best.strip_prefix, best.add_prefix, best.matched) == ("module.", None, 3)
    assert best.command() == "ckptsurgeon rename CKPT -o OUT --strip-prefix module."
    assert best.command("my ckpt.pt", "out.pt") == ("ckptsurgeon rename 'my ckpt.pt' -o out.pt --strip-prefix module.")


def test_suggest_backbone_prefix_both_ways():
    backbone = ["conv1.weight", "bn1.running_mean", "conv1x1.weight"]
    model = [f"backbone.{k}" for k in backbone] + ["head.weight"]
    (add,) = suggest_renames(backbone, model)
    assert (add.strip_prefix, add.add_prefix, add.matched) == (None, "backbone.", 3)
    assert add.command() == "ckptsurgeon rename CKPT -o OUT --add-prefix backbone."
    (strip,) = suggest_renames(model, backbone)
    assert (strip.strip_prefix, strip.add_prefix, strip.matched) == ("backbone.", None, 3)


def test_suggest_replacing_one_prefix_with_another():
    ckpt = ["model.encoder.layer.0.w", "model.encoder.layer.1.w"]
    model = ["backbone.layer.0.w", "backbone.layer.1.w"]
    (best,) = suggest_renames(ckpt, model)
    assert (best.strip_prefix, best.add_prefix, best.matched) == ("model.encoder.", "backbone.", 2)
    assert best.command() == ("ckptsurgeon rename CKPT -o OUT --strip-prefix model.encoder. --add-prefix backbone.")


def test_no_suggestion_unless_strictly_better():
    assert suggest_renames(["a.w", "b.w"], ["a.w", "b.w"]) == []
    assert suggest_renames(["x.w", "y.v"], ["a.q", "b.r"]) == []
    # stripping would make 'module.b' collide with the existing 'b': the rename would refuse
    assert suggest_renames(["module.a", "module.b", "b"], ["a", "b"]) == []
    assert suggest_renames(["module.a", "module.b"], ["a", "b"])[0].matched == 2
    # adding 'enc.' would match 1 key but unmatch the 2 that match now
    assert suggest_renames(["a", "b", "c"], ["a", "b", "enc.c"]) == []


keys_strategy = st.lists(
    st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), min_size=1, max_size=4).map(".".join),
    min_size=1,
    max_size=12,
    unique=True,
)


@settings(max_examples=40, deadline=None)
@given(keys=keys_strategy, prefix=st.sampled_from(["module.", "model.", "backbone.", "_orig_mod.", "a.b."]))
def test_suggestion_recovers_a_wrapping_prefix(keys, prefix):
    wrapped = [prefix + k for k in keys]
    for ckpt, model in ((wrapped, keys), (keys, wrapped)):
        suggestions = suggest_renames(ckpt, model)
        assert suggestions and suggestions[0].matched == len(keys)
        assert sorted(suggestions[0].apply(k) for k in ckpt) == sorted(model)


# ------------------------------------------------------------------------------------------------
# the sample checkpoints


def test_sample_checkpoints_are_small_and_load_safely():
    from safetensors.torch import load_file

    from sample_models.make_samples import FILES

    for name in FILES:
        assert (SAMPLES / name).stat().st_size < 200_000, name
    sd = torch.load(SAMPLES / "smallcnn.pt", weights_only=True)
    SmallCNN().load_state_dict(sd)  # strict
    assert "conv1.weight" in sd and "conv1x1.weight" in sd
    legacy = torch.load(SAMPLES / "smallcnn_legacy.pt", weights_only=True)
    safetensors = load_file(SAMPLES / "smallcnn.safetensors")
    train = torch.load(SAMPLES / "smallcnn_train.ckpt", weights_only=True)
    assert set(train) == {"epoch", "model_state_dict", "optimizer_state_dict", "loss"}
    for other in (legacy, safetensors, train["model_state_dict"]):
        assert list(other) == list(sd) or set(other) == set(sd)
        assert all(torch.equal(other[k], sd[k]) and other[k].dtype == sd[k].dtype for k in sd)
    assert legacy._metadata == sd._metadata
    dp = torch.load(SAMPLES / "smallcnn_dp.pt", weights_only=True)
    assert list(dp) == [f"module.{k}" for k in sd]
    tied = torch.load(SAMPLES / "tiedlm.pt", weights_only=True)
    assert tied["embed.weight"].untyped_storage().data_ptr() == tied["head.weight"].untyped_storage().data_ptr()
    buffers = torch.load(SAMPLES / "buffernet.pt", weights_only=True)
    assert "cache" not in buffers and buffers["bn.num_batches_tracked"].item() == 1


def test_sample_dp_checkpoint_check_and_suggested_fix():
    dp = torch.load(SAMPLES / "smallcnn_dp.pt", weights_only=True)
    model = load_model("sample_models.models:SmallCNN")
    report = check_model(shapes_of(dp), model, metadata=dp._metadata)
    assert not report.compatible()
    (fix,) = report.renames
    fixed = OrderedDict((fix.apply(k), v) for k, v in dp.items())
    fixed._metadata = {fix.apply(k) if k.startswith("module") else k: v for k, v in dp._metadata.items()}
    assert check_model(shapes_of(fixed), model, metadata=fixed._metadata).compatible()


@pytest.mark.parametrize("cpu", ["native", "default"])
def test_make_samples_script_reproduces_the_committed_files(tmp_path, cpu):
    """The samples hold seeded values made by integer arithmetic, never trained ones, so any CPU
    writes the committed bytes: `ATEN_CPU_CAPABILITY=default` makes torch use its plain kernels
    instead of this machine's AVX2/AVX-512 ones, as another CPU would (comparing bytes is right
    here: no value is computed in floating point)."""
    env = {**os.environ, "PYTHONWARNINGS": "error::UserWarning"}
    if cpu == "default":
        env.update(ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(SAMPLES / "make_samples.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    made = sorted(p.name for p in tmp_path.iterdir())
    assert len(made) == 7
    for name in made:
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name
