"""MODEL spec resolution: torchvision:NAME, package.module:factory, presets, and the errors for each failure."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from neural_mechanics.errors import ModelSpecError
from neural_mechanics.experiments.specs import ResolvedModel, resolve_model, torchvision_input_shape

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test (this machine is offline, and specs must never download)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download weights: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def run(resolved: ResolvedModel) -> torch.Tensor:
    resolved.model.eval()
    with torch.no_grad():
        return resolved.model(resolved.example_inputs(2))


# -- torchvision -------------------------------------------------------------------------------


def test_torchvision_resnet18_with_num_classes():
    r = resolve_model("torchvision:resnet18", num_classes=7)
    assert isinstance(r.model, nn.Module)
    assert r.input_shape == (3, 64, 64)
    assert r.num_classes == 7
    assert run(r).shape == (2, 7)
    assert r.spec == "torchvision:resnet18"


def test_torchvision_default_num_classes_is_1000():
    r = resolve_model("torchvision:mobilenet_v3_small")
    assert r.num_classes == 1000
    assert run(r).shape == (2, 1000)


def test_torchvision_vit_gets_224_inputs():
    r = resolve_model("torchvision:vit_b_32", num_classes=3)
    assert r.input_shape == (3, 224, 224)
    r.model.eval()
    with torch.no_grad():
        assert r.model(r.example_inputs(1)).shape == (1, 3)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("vit_b_16", (3, 224, 224)),
        ("swin_t", (3, 224, 224)),
        ("swin3d_t", (3, 16, 224, 224)),
        ("maxvit_t", (3, 224, 224)),
        ("inception_v3", (3, 299, 299)),
        ("r3d_18", (3, 16, 112, 112)),
        ("resnet50", (3, 64, 64)),
        ("vgg16_bn", (3, 64, 64)),
    ],
)
def test_torchvision_input_shape_table(name, shape):
    assert torchvision_input_shape(name) == shape


def test_torchvision_segmentation_builds_without_backbone_download():
    r = resolve_model("torchvision:lraspp_mobilenet_v3_large", num_classes=4)
    out = run(r)
    assert out["out"].shape == (2, 4, 64, 64)


def test_torchvision_unknown_name_suggests_close_matches():
    with pytest.raises(ModelSpecError) as info:
        resolve_model("torchvision:resnet19")
    text = str(info.value)
    assert "torchvision:resnet18" in text and "list_models" in text


def test_torchvision_detection_models_are_refused_with_a_way_out():
    with pytest.raises(ModelSpecError, match=r"package\.module:factory"):
        resolve_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")


def test_torchvision_bad_kwargs_become_model_spec_errors():
    # a negative class count makes nn.Linear raise inside torchvision's builder
    with pytest.raises(ModelSpecError, match="could not build"):
        resolve_model("torchvision:resnet18", num_classes=-1)


# -- presets -----------------------------------------------------------------------------------


def test_preset_spec():
    r = resolve_model("vgg16-bn-cifar10")
    assert r.input_shape == (3, 32, 32) and r.num_classes == 10
    assert run(r).shape == (2, 10)
    r = resolve_model("digits-vgg-bn", num_classes=4)
    assert r.num_classes == 4 and run(r).shape == (2, 4)


def test_input_shape_override():
    r = resolve_model("mlp", input_shape=(64,))
    assert r.input_shape == (64,)
    assert run(r).shape == (2, 10)


def test_bare_torchvision_name_points_to_the_prefix():
    with pytest.raises(ModelSpecError, match="torchvision:resnet18"):
        resolve_model("resnet18")


def test_unknown_preset_suggests_presets():
    with pytest.raises(ModelSpecError, match="vgg16-bn-tinyimagenet"):
        resolve_model("vgg16-bn-tinyimagenett")


# -- package.module:factory --------------------------------------------------------------------

USER_MODULE = textwrap.dedent(
    """
    from torch import nn

    def with_classes(num_classes=5):
        return nn.Sequential(nn.Conv2d(2, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    def no_args():
        return nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))

    def returns_class():
        return Net

    class Net(nn.Module):
        input_shape = (6,)

        def __init__(self, num_classes=2):
            super().__init__()
            self.fc = nn.Linear(6, num_classes)

        def forward(self, x):
            return self.fc(x)

    instance = nn.Linear(5, 2)

    def raises():
        raise RuntimeError("boom")

    def returns_string():
        return "not a model"

    def needs_args(width):
        return nn.Linear(width, 2)

    def embedding_model():
        return nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(4, 2))

    class Outer:
        @staticmethod
        def build(num_classes=3):
            return nn.Linear(7, num_classes)

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "nm_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "nm_user_models"
    sys.modules.pop("nm_user_models", None)


def test_factory_with_num_classes(user_module):
    r = resolve_model(f"{user_module}:with_classes", num_classes=9)
    assert r.input_shape == (2, 64, 64)  # inferred from the first Conv2d
    assert r.num_classes == 9
    assert run(r).shape == (2, 9)


def test_factory_default_num_classes_read_from_signature(user_module):
    r = resolve_model(f"{user_module}:with_classes")
    assert r.num_classes == 5 and run(r).shape == (2, 5)


def test_factory_without_arguments_ignores_num_classes(user_module):
    r = resolve_model(f"{user_module}:no_args", num_classes=11)
    assert r.input_shape == (12,)
    assert run(r).shape == (2, 3)


def test_nn_module_class_and_factory_returning_a_class(user_module):
    for spec in (f"{user_module}:Net", f"{user_module}:returns_class"):
        r = resolve_model(spec, num_classes=4)
        assert r.input_shape == (6,)  # from the class's input_shape attribute
        assert r.num_classes == 4 and run(r).shape == (2, 4)
    assert resolve_model(f"{user_module}:Net").num_classes == 2


def test_module_instance_is_used_as_is(user_module):
    import nm_user_models

    r = resolve_model(f"{user_module}:instance")
    assert r.model is nm_user_models.instance
    assert r.input_shape == (5,) and r.num_classes == 2
    with pytest.raises(ModelSpecError, match="already-built"):
        resolve_model(f"{user_module}:instance", num_classes=3)


def test_dotted_attribute_path(user_module):
    r = resolve_model(f"{user_module}:Outer.build", num_classes=6)
    assert r.input_shape == (7,) and run(r).shape == (2, 6)


@pytest.mark.parametrize(
    ("attr", "match"),
    [
        ("raises", "raised RuntimeError: boom"),
        ("returns_string", "not an nn.Module"),
        ("needs_args", "raised TypeError"),
        ("NOT_CALLABLE", "not a factory"),
        ("with_clases", "did you mean with_classes"),
        ("embedding_model", "cannot tell what input"),
    ],
)
def test_factory_errors(user_module, attr, match):
    with pytest.raises(ModelSpecError, match=match):
        resolve_model(f"{user_module}:{attr}")


def test_unimportable_module():
    with pytest.raises(ModelSpecError, match=r"cannot import module 'no_such_pkg_xyz\.models'"):
        resolve_model("no_such_pkg_xyz.models:build")


@pytest.mark.parametrize("spec", [":factory", "pkg.mod:"])
def test_malformed_import_spec(spec):
    with pytest.raises(ModelSpecError, match=r"package\.module:factory"):
        resolve_model(spec)


def test_project_factories_resolve_by_module_path():
    r = resolve_model("neural_mechanics.experiments.models:vgg16", num_classes=200)
    assert r.input_shape == (3, 64, 64)
    r = resolve_model("neural_mechanics.experiments.models:DigitsVGG")
    assert r.input_shape == (1, 8, 8) and r.num_classes == 10
    assert run(r).shape == (2, 10)


def test_example_inputs_are_seeded():
    r = resolve_model("mlp")
    assert torch.equal(r.example_inputs(3, seed=1), r.example_inputs(3, seed=1))
    assert not torch.equal(r.example_inputs(3, seed=1), r.example_inputs(3, seed=2))
    assert r.example_inputs(3).shape == (3, 1, 8, 8)
