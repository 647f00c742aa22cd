"""The stronger recipe's switches and class balance: the schedule, MixUp/CutMix, EMA through
Lightning's callback, the balanced sampler and the class-weighted loss."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from tests.conftest import COLORS, make_image_folder
from tests.helpers import fit_args, read_csv, run_dirs
from tl_project import ImageDataModule, main
from tl_project.checkpoints import read_checkpoint
from tl_project.data.datasets import BalancedEpochSampler
from tl_project.recipe import EMA, BatchMix, balanced_class_weights, mix_seed, recipe_traps, warm_decay, warmup_cosine


def test_warmup_then_cosine_to_zero() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_steps=2)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(rates[2:]))  # falls after the warmup
    assert rates[-1] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 7 / 8)).item()))


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixed_targets_are_class_probabilities(mixup: float, cutmix: float) -> None:
    torch.manual_seed(0)
    images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mixed, targets = BatchMix(mixup, cutmix, num_classes=3)(images, labels, seed=0)
    assert mixed.shape == images.shape and targets.shape == (8, 3)
    assert torch.allclose(targets.sum(dim=1), torch.ones(8)) and (targets >= 0).all()
    assert not torch.equal(mixed, images)
    assert not BatchMix(0.0, 0.0, 3)


def test_a_mix_follows_from_its_seed_alone() -> None:
    images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mix = BatchMix(0.2, 1.0, num_classes=3)
    first = mix(images, labels, seed=mix_seed(42, 3, 5, 0))
    torch.manual_seed(123)  # the global generator's state does not matter ...
    again = mix(images, labels, seed=mix_seed(42, 3, 5, 0))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = mix(images, labels, seed=mix_seed(42, 3, 6, 0))  # ... the batch does
    assert not torch.equal(first[0], other[0])


def test_the_ema_decay_warms_up_to_its_ceiling() -> None:
    decays = warm_decay(0.999, torch.tensor([0, 1, 10, 45, 100_000])).tolist()
    assert decays == pytest.approx([0.1, 2 / 11, 11 / 20, 46 / 55, 0.999])
    # A 45-step run: what is left of the start in the average (the weights at step 0).
    left = {name: 1.0 for name in ("warm", "fixed")}
    for n in range(1, 45):
        left["warm"] *= float(warm_decay(0.999, torch.tensor(n)))
        left["fixed"] *= 0.999
    assert left["fixed"] > 0.95 and left["warm"] < 1e-6


def test_recipe_traps_name_what_cannot_pay_off() -> None:
    lightning_ema = EMAWeightAveraging(decay=0.999)
    traps = recipe_traps(45, 15, [lightning_ema, EMA(decay=0.999)], 1.0, False, [20, 20])
    assert len(traps) == 1 and "fixed decay 0.999 averages about 1000 steps" in traps[0]
    assert recipe_traps(45, 15, [EMA(decay=0.999, warmup=False)], 1.0, False, [])[0].startswith("The EMA's fixed decay")
    assert not recipe_traps(20_000, 15, [lightning_ema], 1.0, True, [500, 500])
    assert not recipe_traps(0, 0, [lightning_ema], 1.0, False, [])  # a run without a known end
    assert "warmup_epochs 3 is over half" in recipe_traps(45, 4, [], 3.0, False, [])[0]
    assert "MixUp/CutMix on 20 training images" in recipe_traps(45, 15, [], 0.0, True, [20, 60])[0]


def test_balanced_class_weights() -> None:
    weights = balanced_class_weights([90, 10, 0])
    assert weights.tolist() == pytest.approx([100 / (2 * 90), 100 / (2 * 10), 0.0])
    assert float((weights * torch.tensor([90.0, 10.0, 0.0])).sum()) == pytest.approx(100.0)


def test_balanced_sampler_draws_every_class_equally_often_and_deterministically() -> None:
    targets = [0] * 900 + [1] * 100
    shares = [BalancedEpochSampler(range(1000), targets, num_replicas=2, rank=r, seed=7) for r in (0, 1)]
    drawn = [list(sampler) for sampler in shares]
    assert len(drawn[0]) == len(drawn[1]) == 500
    counts = Counter(targets[index] for share in drawn for _, index in share)
    assert 0.45 < counts[1] / 1000 < 0.55  # 10 % of the images, half of the draws
    assert drawn[0] == list(BalancedEpochSampler(range(1000), targets, num_replicas=2, rank=0, seed=7))
    shares[0].set_epoch(1)
    assert list(shares[0]) != drawn[0] and all(epoch == 1 for epoch, _ in shares[0])


def _imbalanced(root: Path) -> Path:
    make_image_folder(root, {"cat": COLORS["cat"]}, per_class=24)
    make_image_folder(root, {"dog": COLORS["dog"]}, per_class=6)
    return root


def test_balance_sampler_in_the_training_loader(tmp_path: Path) -> None:
    data = ImageDataModule(
        dataset=None, root=str(_imbalanced(tmp_path / "images")), batch_size=4, num_workers=0, balance="sampler"
    )
    data.setup("fit")
    assert data.class_counts == [20, 4]  # 24 and 6 less the held-out images
    labels = [int(t) for epoch in range(20) for t in _epoch_labels(data, epoch)]
    assert 0.35 < sum(labels) / len(labels) < 0.65  # dog: 1 image in 6, about half of the draws


def _epoch_labels(data: ImageDataModule, epoch: int) -> list[int]:
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    return [t for _, targets, _ in loader for t in targets.tolist()]


def test_balance_loss_weights_the_training_loss(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    root = _imbalanced(tmp_path / "images")
    main(fit_args(root, tmp_path / "runs", "--data.balance", "loss", "--trainer.max_epochs", "1"))
    assert "Class weights of the training loss (data.balance loss): cat 0.6, dog 3" in capfd.readouterr().out


def test_imbalance_report_points_to_the_option(tmp_path: Path) -> None:
    data = ImageDataModule(dataset=None, root=str(_imbalanced(tmp_path / "images")), num_workers=0)
    report = data.check(data.folder_splits(), data.class_names)
    assert "--data.balance sampler or loss" in report.format(data.class_names)


def test_strong_switches_train_and_ema_weights_are_what_the_checkpoint_evaluates(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", COLORS, per_class=10)
    switches = ["--model.schedule", "cosine", "--model.warmup_epochs", "1", "--model.mixup", "0.2"]
    switches += ["--model.cutmix", "1.0", "--model.label_smoothing", "0.1", "--trainer.max_epochs", "3"]
    switches += ["--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging"]
    switches += ["--trainer.callbacks.decay", "0.5", "--trainer.log_every_n_steps", "1"]
    main(fit_args(root, tmp_path / "runs", *switches))
    run = run_dirs(tmp_path / "runs")[0]
    rates = [float(row["lr-SGD"]) for row in read_csv(run / "metrics.csv") if row.get("lr-SGD")]
    peak = rates.index(max(rates))
    assert 0 < peak < len(rates) - 1 and rates[0] < rates[peak] > rates[-1]  # warmup, then down, every step

    last = run / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(last)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert not torch.equal(averaged["head.weight"], raw["head.weight"])
    # test evaluates the averaged weights (state_dict): the raw ones give another loss.
    raw_copy = tmp_path / "raw.ckpt"
    torch.save({**checkpoint, "state_dict": raw}, raw_copy)
    losses = []
    for path in (last, raw_copy):
        main(["test", "--ckpt_path", str(path), "--trainer.default_root_dir", str(tmp_path / "runs")])
        losses.append(float(read_csv(run_dirs(tmp_path / "runs")[-1] / "metrics.csv")[-1]["test/loss"]))
    assert losses[0] != pytest.approx(losses[1], rel=1e-4)
