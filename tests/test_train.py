"""The training loop on tiny learnable data: it learns, resumes bit-identically, and stops on a NaN loss."""

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL_CONFIG, learnable_images

from image_classifier.data import Split
from image_classifier.errors import UserError
from image_classifier.models import QuickstartMLP, build_model
from image_classifier.augment import augment
from image_classifier.plan import batch_starts
from image_classifier.train import resume_path, train


def make_split(size: int, seed: int) -> Split:
    labels = torch.arange(size) % 10
    return Split(learnable_images(labels, seed).unsqueeze(1), labels)


CONFIG = TINY_MODEL_CONFIG


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_quickstart_mlp_is_the_tutorial_network() -> None:
    model = QuickstartMLP((1, 28, 28), 10)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(512, 784), (512,), (512, 512), (512,), (10, 512), (10,)]
    assert sum(p.numel() for p in model.parameters()) == 669_706


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_models_adapt_to_input_shape(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(
        {
            **CONFIG,
            "model": name,
            "image_shape": list(shape),
            "mean": [0.5] * shape[0],
            "std": [0.25] * shape[0],
        }
    )
    assert model(torch.rand(3, *shape)).shape == (3, 10)


def test_augment_keeps_shape_and_translates_content() -> None:
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 10:18, 10:18] = 255
    out = augment(images, crop_padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert (out.sum(dim=(1, 2, 3)) == images.sum(dim=(1, 2, 3))).all()  # shifted within the padding: no loss
    assert not torch.equal(out, images)
    same = augment(images, 2, True, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)


def test_batch_starts_drops_a_last_batch_of_one() -> None:
    assert batch_starts(10, 4) == [0, 4, 8]
    assert batch_starts(9, 4) == [0, 4]


def test_training_learns_and_keeps_the_best_epoch(tiny_params, tmp_path: Path) -> None:
    params = tiny_params.train.model_copy(update={"epochs": 3})
    seen = []
    result = train(
        params,
        CONFIG,
        make_split(400, 1),
        make_split(100, 2),
        torch.device("cpu"),
        tmp_path / "resume.pt",
        on_epoch=seen.append,
    )
    assert [row["epoch"] for row in seen] == [1, 2, 3]
    assert result.best_val_accuracy == max(row["val_accuracy"] for row in result.history)
    assert result.best_val_accuracy > 0.5  # chance is 0.1
    assert set(result.final_checkpoint) >= {"model", "optimizer", "scheduler", "generator", "epoch"}


def test_resume_after_interruption_is_bit_identical(tiny_params, tmp_path: Path) -> None:
    params = tiny_params.train.model_copy(update={"epochs": 3})
    train_split, val_split = make_split(300, 1), make_split(100, 2)
    uninterrupted = train(params, CONFIG, train_split, val_split, torch.device("cpu"), tmp_path / "a.pt")

    def interrupt_after_first_epoch(stats: dict[str, float]) -> None:
        if stats["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            params,
            CONFIG,
            train_split,
            val_split,
            torch.device("cpu"),
            tmp_path / "b.pt",
            on_epoch=interrupt_after_first_epoch,
        )
    assert torch.load(tmp_path / "b.pt", weights_only=True)["epoch"] == 1
    replayed = []
    resumed = train(
        params,
        CONFIG,
        train_split,
        val_split,
        torch.device("cpu"),
        tmp_path / "b.pt",
        on_epoch=replayed.append,
    )
    assert [row["epoch"] for row in replayed] == [1, 2, 3]  # restored history is reported again
    assert state_hash(resumed.final_checkpoint["model"]) == state_hash(
        uninterrupted.final_checkpoint["model"]
    )
    assert state_hash(resumed.best_state) == state_hash(uninterrupted.best_state)


def test_two_runs_are_bit_identical(tiny_params, tmp_path: Path) -> None:
    args = (tiny_params.train, CONFIG, make_split(200, 1), make_split(50, 2), torch.device("cpu"))
    first = train(*args, tmp_path / "1.pt")
    second = train(*args, tmp_path / "2.pt")
    assert state_hash(first.best_state) == state_hash(second.best_state)
    assert first.history[-1]["val_loss"] == second.history[-1]["val_loss"]


def test_non_finite_loss_stops_with_epoch_and_step(tiny_params, tmp_path: Path) -> None:
    params = tiny_params.train.model_copy(
        update={
            "lr": 10.0,
            "momentum": 0.99,
            "schedule": "none",
            "label_smoothing": 0.0,
            "model": "mlp",
            "epochs": 3,
            "optimizer": "sgd",
        }
    )
    config = {**CONFIG, "model": "mlp"}
    # This recipe blows up in epoch 1, before any checkpoint exists (tests/test_faults.py has a later one).
    with pytest.raises(
        UserError,
        match=r"loss became non-finite at epoch 1, step \d+; training stopped, no epoch completed, so there is no",
    ):
        train(params, config, make_split(400, 1), make_split(100, 2), torch.device("cpu"), tmp_path / "r.pt")
    assert not (tmp_path / "r.pt").exists()


def test_batch_larger_than_data_is_refused(tiny_params, tmp_path: Path) -> None:
    params = tiny_params.train.model_copy(update={"batch_size": 10_000})
    with pytest.raises(UserError, match=r"train.batch_size = 10000 is larger than the training set \(200"):
        train(params, CONFIG, make_split(200, 1), make_split(50, 2), torch.device("cpu"), tmp_path / "r.pt")


def test_resume_path_changes_with_params_and_data(tmp_path: Path) -> None:
    data = tmp_path / "d.pt"
    data.write_bytes(b"one")
    first = resume_path(tmp_path, {"train.lr": 0.1}, [data])
    assert first == resume_path(tmp_path, {"train.lr": 0.1}, [data])
    assert first != resume_path(tmp_path, {"train.lr": 0.2}, [data])
    data.write_bytes(b"two")
    assert first != resume_path(tmp_path, {"train.lr": 0.1}, [data])


def test_training_without_a_validation_split_keeps_the_last_epoch(tiny_params, tmp_path: Path) -> None:
    empty = Split(torch.zeros(0, 1, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    result = train(
        tiny_params.train, CONFIG, make_split(200, 1), empty, torch.device("cpu"), tmp_path / "r.pt"
    )
    assert result.best_epoch == tiny_params.train.epochs
    assert all(row["val_accuracy"] != row["val_accuracy"] for row in result.history)  # NaN: nothing to score


def test_test_time_flip_averages_an_image_and_its_mirror_in_eval_mode_only() -> None:
    model = build_model({**TINY_MODEL_CONFIG, "test_time_flip": True})
    images = torch.rand(4, 1, 28, 28)
    plain = build_model({**TINY_MODEL_CONFIG, "test_time_flip": False})
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    expected = (plain(images) + plain(images.flip(3))) / 2
    assert torch.allclose(model(images), expected, atol=1e-6)
    assert not torch.allclose(model(images), plain(images), atol=1e-4)
    model.train(), plain.train()  # training sees one view: the augmentation already flips
    assert torch.equal(model(images), plain(images))
