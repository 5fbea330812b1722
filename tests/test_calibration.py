"""Calibration: the metrics against hand-computed values, the temperature fit on over- and under-confident
models, the temperature inside the model (eval mode only, saved, loaded, ignored by warm starts), and the train
stage's step with and without a validation split."""

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL_CONFIG, learnable_images
from test_train import make_split
from torch import nn

from image_classifier.calibration import (
    MIN_CALIBRATION_IMAGES,
    brier_score,
    calibrate,
    calibrated_state,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)
from image_classifier.data import Split
from image_classifier.evaluate import evaluate
from image_classifier.export import load_model, save_model
from image_classifier.models import ImageClassifier, build_model, predict_logits
from image_classifier.warm_start import load_initial_weights

# Four images, two classes. Top-1 confidences 0.9 (right), 0.92 (wrong): both in bin 13 of 15, (13/15, 14/15];
# 0.55 (right): bin 8; 0.7 (wrong): bin 10.
PROBABILITIES = torch.tensor([[0.9, 0.1], [0.92, 0.08], [0.45, 0.55], [0.3, 0.7]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_ece_nll_and_brier_match_hand_computed_values() -> None:
    bins = reliability_bins(PROBABILITIES, LABELS)
    assert bins.count.tolist() == [0] * 8 + [1, 0, 1, 0, 0, 2, 0]
    assert bins.accuracy[13].item() == 0.5 and bins.confidence[13].item() == pytest.approx(0.91)
    # Bin 13: half the images, |0.5 - 0.91|; bin 8: a quarter, |1 - 0.55|; bin 10: a quarter, |0 - 0.7|.
    expected_ece = 0.5 * 0.41 + 0.25 * 0.45 + 0.25 * 0.7
    assert expected_calibration_error(PROBABILITIES, LABELS) == pytest.approx(expected_ece)
    # Brier: per image, the squared distance to the one-hot label over both classes.
    expected_brier = (2 * 0.1**2 + 2 * 0.92**2 + 2 * 0.45**2 + 2 * 0.7**2) / 4
    assert brier_score(PROBABILITIES, LABELS) == pytest.approx(expected_brier)
    logits = PROBABILITIES.log()  # softmax(log p) = p
    expected_nll = -(math.log(0.9) + math.log(0.08) + math.log(0.55) + math.log(0.3)) / 4
    assert negative_log_likelihood(logits, LABELS) == pytest.approx(expected_nll, rel=1e-6)
    metrics = calibration_metrics(logits, LABELS)
    assert metrics["ece"] == pytest.approx(expected_ece, rel=1e-6)
    assert metrics["mean_confidence"] == pytest.approx((0.9 + 0.92 + 0.55 + 0.7) / 4, rel=1e-6)


def test_bin_edges_belong_to_the_bin_below() -> None:
    probabilities = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]], dtype=torch.float64)
    bins = reliability_bins(probabilities, torch.tensor([0, 0, 1]), bins=5)
    assert bins.count.tolist() == [0, 0, 1, 1, 1]  # 0.5 in (0.4, 0.6], 0.8 in (0.6, 0.8], 1.0 in (0.8, 1]


def synthetic_logits(scale: float, size: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a perfectly calibrated model (labels are drawn from their own softmax), multiplied by `scale`:
    above 1 an over-confident model, below 1 an under-confident one. The best temperature is `scale`."""
    generator = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(size, 10, generator=generator)
    labels = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    return scale * logits, labels


@pytest.mark.parametrize("scale", [3.0, 1 / 3])
def test_fit_temperature_undoes_over_and_under_confidence(scale: float) -> None:
    logits, labels = synthetic_logits(scale)
    temperature = fit_temperature(logits, labels)
    assert (temperature > 1) == (scale > 1)
    assert temperature == pytest.approx(scale, rel=0.1)
    before, after = calibration_metrics(logits, labels), calibration_metrics(logits / temperature, labels)
    assert after["nll"] < before["nll"] - 0.05
    assert after["ece"] < 0.03 < before["ece"]
    assert torch.equal((logits / temperature).argmax(1), logits.argmax(1))  # no prediction changes


def bar_finder(scale: float) -> nn.Module:
    """A generic (not mlp, not cnn) network for conftest's learnable images: one logit per class, `scale` times
    the mean brightness of the row band where that class's bar is drawn."""
    weight = torch.zeros(10, 1, 28, 28)
    for label in range(10):
        weight[label, 0, 2 + 2 * label : 4 + 2 * label, 4:24] = 1 / 40
    linear = nn.Linear(28 * 28, 10, bias=False)
    linear.weight.data = scale * weight.flatten(1)
    return nn.Sequential(nn.Flatten(), linear)


def noisy_split(size: int, seed: int) -> Split:
    """Learnable images whose labels are 30% random: a model that finds the bar is right about 73% of the time."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(size) % 10
    images = learnable_images(labels, seed).unsqueeze(1)
    noisy = torch.rand(size, generator=generator) < 0.3
    labels = torch.where(noisy, torch.randint(0, 10, (size,), generator=generator), labels)
    return Split(images, labels)


@pytest.mark.parametrize(("scale", "over_confident"), [(40.0, True), (1.0, False)])
def test_calibrate_lowers_the_validation_nll_of_any_wrapped_network(
    scale: float, over_confident: bool
) -> None:
    model = ImageClassifier(bar_finder(scale), mean=[0.0], std=[1.0]).eval()
    val = noisy_split(500, 3)
    raw = model(val.images.float() / 255)
    found = calibrate(model, val)
    assert not isinstance(found, str), found  # a reason it was skipped
    confidence, accuracy = found.before["mean_confidence"], (raw.argmax(1) == val.labels).float().mean()
    assert (confidence > accuracy) == over_confident  # the model really is what the test says
    assert (found.temperature > 1) == over_confident
    assert found.after["nll"] < found.before["nll"]
    assert found.after["ece"] < found.before["ece"]
    assert model.temperature.item() == pytest.approx(found.temperature)
    calibrated = model(val.images.float() / 255)
    torch.testing.assert_close(calibrated, raw / found.temperature)
    assert torch.equal(calibrated.argmax(1), raw.argmax(1))


def test_temperature_divides_inference_logits_only() -> None:
    model = build_model(TINY_MODEL_CONFIG)
    images = torch.rand(4, 1, 28, 28)
    model.eval()
    raw = model(images)
    model.set_temperature(0.5)
    torch.testing.assert_close(model(images), raw / 0.5)
    model.train()  # training sees the raw logits, whatever the temperature
    model.set_temperature(1.0)
    at_one = model(images)
    model.set_temperature(0.5)
    assert torch.equal(model(images), at_one)


def test_temperature_survives_save_and_load_and_old_files_load_at_one(tmp_path: Path) -> None:
    model = build_model(TINY_MODEL_CONFIG)
    model.set_temperature(0.65)
    save_model(tmp_path / "model.pt", TINY_MODEL_CONFIG, model.state_dict())
    loaded, _ = load_model(tmp_path / "model.pt")
    assert loaded.temperature.item() == pytest.approx(0.65)
    images = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(images), model.eval()(images))

    old = {key: value for key, value in model.state_dict().items() if key != "temperature"}
    save_model(tmp_path / "old.pt", TINY_MODEL_CONFIG, old)  # a file from before calibration existed
    loaded, _ = load_model(tmp_path / "old.pt")
    assert loaded.temperature.item() == 1.0
    torch.testing.assert_close(loaded(images), model(images) * 0.65)


def test_a_warm_start_trains_at_temperature_one(tmp_path: Path) -> None:
    model = build_model(TINY_MODEL_CONFIG)
    model.set_temperature(2.5)
    save_model(tmp_path / "calibrated.pt", TINY_MODEL_CONFIG, model.state_dict())
    warm, report = load_initial_weights(TINY_MODEL_CONFIG, tmp_path / "calibrated.pt")
    assert warm.temperature.item() == 1.0
    assert "temperature" not in report.matched + report.missing + report.unexpected


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The best weights of a two-epoch tiny run (label smoothing and test-time flip on, as by default)."""
    from conftest import tiny_params_dict

    from image_classifier import params as params_module
    from image_classifier.train import train

    params = params_module.from_dict(tiny_params_dict()).train
    folder = tmp_path_factory.mktemp("calibrate")
    result = train(
        params,
        TINY_MODEL_CONFIG,
        make_split(400, 1),
        make_split(100, 2),
        torch.device("cpu"),
        folder / "r.pt",
    )
    return result.best_state


def test_the_train_step_fits_the_temperature_on_validation(trained, tmp_path: Path, capsys) -> None:
    val = noisy_split(200, 5)
    state, metrics = calibrated_state(TINY_MODEL_CONFIG, trained, val, enabled=True)
    assert trained["temperature"].item() == 1.0  # the best weights themselves are left alone
    assert state["temperature"].item() == pytest.approx(metrics["calibration.temperature"]) != 1.0
    assert metrics["calibration.val_nll_after"] < metrics["calibration.val_nll_before"]
    assert set(metrics) == {
        "calibration.temperature",
        *(f"calibration.val_{m}_{w}" for m in ("ece", "nll") for w in ("before", "after")),
    }
    assert capsys.readouterr().out.startswith("calibration: temperature ")

    # Its metrics and reliability diagram at evaluation.
    model = build_model(TINY_MODEL_CONFIG)
    model.load_state_dict(state)
    outputs = {name: tmp_path / f"{name}.out" for name in ("metrics", "predictions", "confusion")}
    outputs |= {name: tmp_path / f"{name}.png" for name in ("misclassified", "reliability")}
    found, _ = evaluate(model.eval(), val, list(TINY_MODEL_CONFIG["classes"]), 64, 4, outputs)
    assert {"ece", "nll", "brier", "mean_confidence"} <= set(found)
    assert found["nll"] == pytest.approx(metrics["calibration.val_nll_after"], rel=1e-4)
    assert outputs["reliability"].read_bytes()[:4] == b"\x89PNG"


def test_the_temperature_is_fitted_from_the_smallest_validation_split_allowed() -> None:
    model = ImageClassifier(bar_finder(40.0), mean=[0.0], std=[1.0]).eval()
    val = noisy_split(MIN_CALIBRATION_IMAGES, 3)
    found = calibrate(model, val)
    assert not isinstance(found, str), found
    assert found.images == MIN_CALIBRATION_IMAGES and found.temperature > 1  # over-confident: softened
    assert isinstance(calibrate(model, val.subset(torch.arange(MIN_CALIBRATION_IMAGES - 1))), str)


@pytest.mark.parametrize(
    ("val_size", "enabled", "line"),
    [
        (
            0,
            True,
            "calibration skipped: the validation split is empty (preprocess.val_size: 0); temperature 1",
        ),
        (100, False, "calibration off (train.calibrate: false): temperature 1"),
        (
            31,  # one short of MIN_CALIBRATION_IMAGES: the fit would be noise
            True,
            "calibration skipped: 31 validation images are too few to fit it on (it takes 32); temperature 1",
        ),
        (
            40,  # forty images the model gets right: NLL falls without end as T shrinks
            True,
            "calibration skipped: the model gets all 40 validation images right, so there is no mistake to fit "
            "it on; temperature 1",
        ),
    ],
)
def test_no_calibration_keeps_temperature_one(
    trained, capsys, val_size: int, enabled: bool, line: str
) -> None:
    val = make_split(val_size, 2)
    if val_size == 40:
        model = build_model(TINY_MODEL_CONFIG)
        model.load_state_dict(trained)
        pool = make_split(200, 2)
        right = predict_logits(model, pool.images, 100).argmax(1) == pool.labels
        assert int(right.sum()) >= 40
        val = pool.subset(torch.nonzero(right).flatten()[:40])
    state, metrics = calibrated_state(TINY_MODEL_CONFIG, trained, val, enabled)
    assert state["temperature"].item() == 1.0
    assert metrics == {"calibration.temperature": 1.0}
    assert capsys.readouterr().out.splitlines() == [line]
