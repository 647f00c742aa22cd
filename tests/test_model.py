"""TransferLearningModel: the head, the fine-tune policy, the optimizer, the class check."""

from __future__ import annotations

import functools

import pytest
import torch

from tl_project.errors import UserError
from tl_project.model import TransferLearningModel


def _model(**kwargs: object) -> TransferLearningModel:
    kwargs = {"num_classes": 3, "backbone": "resnet18", "weights": None, **kwargs}
    return TransferLearningModel(**kwargs)  # type: ignore[arg-type]


def _train_step(model: TransferLearningModel) -> None:
    optimizer = model.configure_optimizers()
    model.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss = model.loss_fn(model(images), labels)
    loss.backward()
    optimizer.step()


def test_new_head_fits_the_classes() -> None:
    model = _model(num_classes=7, class_names=[f"c{i}" for i in range(7)])
    assert model.head.in_features == 512 and model.head.out_features == 7
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.class_names == [f"c{i}" for i in range(7)]


def test_full_finetune_trains_everything_with_the_recipe_optimizer() -> None:
    model = _model()
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["lr"] == 0.001 and optimizer.defaults["momentum"] == 0.9
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters()}


def test_head_finetune_freezes_weights_and_batchnorm_statistics() -> None:
    model = _model(finetune="head")
    optimizer = model.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.head.parameters()}

    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.weight.clone()
    _train_step(model)
    assert not model.backbone.training and model.head.training
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key  # weights, running_mean/var, num_batches_tracked
    assert not torch.equal(model.head.weight, head_before)


def test_full_finetune_updates_batchnorm_statistics() -> None:
    model = _model()
    before = model.backbone.bn1.running_mean.clone()
    _train_step(model)
    assert not torch.equal(model.backbone.bn1.running_mean, before)


def test_freeze_batchnorm_trains_the_backbone_with_fixed_statistics() -> None:
    model = _model(freeze_batchnorm=True)
    statistics = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running_" in k}
    conv1, bn1_scale = model.backbone.conv1.weight.clone(), model.backbone.bn1.weight.clone()
    _train_step(model)
    assert model.backbone.training and not model.backbone.bn1.training
    for key, value in statistics.items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert not torch.equal(model.backbone.conv1.weight, conv1)  # the weights train
    assert not torch.equal(model.backbone.bn1.weight, bn1_scale)  # BatchNorm's scale too
    assert not model.batchnorm_trains and _model().batchnorm_trains


def test_flip_tta_averages_each_image_with_its_mirror() -> None:
    model, plain = _model(tta="flip").eval(), _model().eval()
    plain.load_state_dict(model.state_dict())
    half = torch.randn(2, 3, 32, 16)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # A symmetric image is its own mirror: TTA changes nothing.
        assert torch.equal(model.evaluate(symmetric), plain.evaluate(symmetric))
        assert torch.allclose(model.evaluate(images), (plain(images) + plain(images.flip(-1))) / 2, atol=1e-6)
        assert not torch.allclose(model.evaluate(images), plain.evaluate(images), atol=1e-4)


def test_injected_optimizer_and_scheduler() -> None:
    model = _model(
        optimizer=functools.partial(torch.optim.AdamW, lr=0.01),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2),
    )
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)


def test_hyperparameters_are_plain_values() -> None:
    model = _model(optimizer=functools.partial(torch.optim.AdamW, lr=0.01))
    assert "optimizer" not in model.hparams
    plain = (str, int, float, bool, type(None))

    def is_plain(value: object) -> bool:
        if isinstance(value, list):
            return all(map(is_plain, value))
        if isinstance(value, dict):
            return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
        return isinstance(value, plain)

    assert all(is_plain(v) for v in model.hparams.values())
    assert model.hparams["preprocessing"]["mean"] == [0.485, 0.456, 0.406]  # lists, not tuples


def test_checkpoint_of_other_classes_is_refused_with_both_lists() -> None:
    model = _model(class_names=["cat", "dog", "fish"])
    checkpoint = {"hyper_parameters": {"num_classes": 2, "class_names": ["ant", "bee"], "backbone": "resnet18"}}
    with pytest.raises(UserError, match=r"(?s)\['ant', 'bee'\].*\['cat', 'dog', 'fish'\]"):
        model.on_load_checkpoint(checkpoint)


def test_class_names_must_match_num_classes() -> None:
    with pytest.raises(UserError, match="class_names"):
        _model(num_classes=3, class_names=["a", "b"])


# --- fast defaults ---


def test_channels_last_is_applied_to_weights_and_inputs() -> None:
    model = _model()
    model.setup("fit")
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    plain = _model(channels_last=False)
    plain.setup("fit")
    assert not plain.backbone.layer1[0].conv2.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_is_in_place_and_keeps_the_checkpoint_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inductor takes minutes to compile on a small CPU; the eager backend goes through the same wiring.
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_module(self, backend="eager"))
    model, eager = _model(compile=True), _model()
    eager.load_state_dict(model.state_dict())
    model.setup("fit")
    compiled = model.backbone._compiled_call_impl
    assert compiled is not None
    model.setup("test")
    assert model.backbone._compiled_call_impl is compiled  # compiled once
    assert list(model.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefixes in checkpoints
    images = torch.randn(2, 3, 32, 32)
    eager.setup("fit")
    assert torch.allclose(model.eval()(images), eager.eval()(images), atol=1e-5)
    _train_step(model)  # gradients flow through the compiled backbone
    assert model.backbone.conv1.weight.grad is not None


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"cache_features": True}, "--model.finetune head"),
        ({"cache_features": True, "finetune": "head", "mixup": 0.2}, "model.mixup"),
        ({"schedule": "cosine", "lr_scheduler": lambda optimizer: None}, "model.lr_scheduler"),
        ({"finetune": "gradual", "backbone_lr_factor": 0.0}, "model.backbone_lr_factor"),
    ],
)
def test_options_that_do_not_go_together_fail_before_anything_is_built(options: dict, named: str) -> None:
    with pytest.raises(UserError, match=named):
        TransferLearningModel(3, backbone="resnet18", weights=None, **options)
