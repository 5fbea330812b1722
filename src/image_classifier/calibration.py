"""Calibration: how far a model's confidence is from its accuracy, and the temperature that closes the gap.

A model is calibrated when, of the images it gives 80% confidence, 80% are right. Label smoothing and the
test-time flip average both shrink logits, so this project's models come out of training under-confident.
Dividing the logits by one number fitted on the validation split (temperature scaling, Guo et al. 2017) fixes
most of that and changes no prediction: a positive scale leaves the argmax where it was.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from image_classifier.batches import split_logits
from image_classifier.data import Split
from image_classifier.device import inference_batch_size
from image_classifier.models import ImageClassifier, build_model

ECE_BINS = 15
# A validation split the model gets entirely right has no best temperature (the NLL keeps falling towards
# T = 0); the fit is clamped so the model file never holds a degenerate one.
TEMPERATURE_RANGE = (0.01, 100.0)
# Below this many validation images the fitted temperature is noise that every later prediction pays for. Models
# trained on small Fashion-MNIST folders, scored on 10,000 held-out images: with 10 to 24 validation images the fit
# raised the expected calibration error on average (0.027 -> 0.095 at 10), from 32 it lowered it, and from 64 in
# every run (docs/benchmarks.md, calibration on small validation splits).
MIN_CALIBRATION_IMAGES = 32


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width bins of top-1 confidence, (0, 1/n], (1/n, 2/n], ..., and what fell into each."""

    edges: torch.Tensor  # n + 1 bin edges from 0 to 1
    count: torch.Tensor  # images per bin
    confidence: torch.Tensor  # mean top-1 probability of the bin's images (0 for an empty bin)
    accuracy: torch.Tensor  # share of the bin's images predicted right (0 for an empty bin)


def reliability_bins(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> ReliabilityBins:
    """The data of a reliability diagram: per confidence bin, how many images, how confident, how accurate."""
    confidence, predictions = probabilities.double().max(dim=1)
    correct = (predictions == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # Right edges belong to their bin (Guo et al.): a confidence of exactly 1/n is in the first bin.
    index = torch.bucketize(confidence, edges[1:-1])
    count = torch.bincount(index, minlength=bins)
    per_bin = count.clamp(min=1).double()
    return ReliabilityBins(
        edges=edges,
        count=count,
        confidence=torch.bincount(index, confidence, minlength=bins) / per_bin,
        accuracy=torch.bincount(index, correct, minlength=bins) / per_bin,
    )


def expected_calibration_error(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """ECE: the gap between accuracy and mean confidence in each bin, weighted by the bin's share of images."""
    found = reliability_bins(probabilities, labels, bins)
    weights = found.count.double() / max(len(labels), 1)
    return float((weights * (found.accuracy - found.confidence).abs()).sum())


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean -log p(true class); from logits (log-softmax) so a near-zero probability stays finite."""
    return float(F.cross_entropy(logits.double(), labels))


def brier_score(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over images of the squared distance between the probabilities and the one-hot label (0 to 2)."""
    one_hot = F.one_hot(labels, probabilities.shape[1]).double()
    return float(((probabilities.double() - one_hot) ** 2).sum(dim=1).mean())


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """ECE, NLL, Brier score and mean top-1 confidence of `logits`, as plain numbers."""
    probabilities = logits.double().softmax(dim=1)
    return {
        "ece": expected_calibration_error(probabilities, labels),
        "nll": negative_log_likelihood(logits, labels),
        "brier": brier_score(probabilities, labels),
        "mean_confidence": float(probabilities.max(dim=1).values.mean()),
    }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T): LBFGS on log T, so T stays positive.

    The NLL is convex in 1/T, so this one-dimensional fit has a single minimum and LBFGS finds it in a few steps.
    """
    logits = logits.detach().double()
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may sit inside torch.no_grad()
        optimizer.step(closure)
    return min(max(math.exp(log_temperature.item()), TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])


@dataclass(frozen=True)
class Calibration:
    temperature: float
    images: int  # validation images it was fitted on
    before: dict[str, float]  # calibration_metrics of the raw logits
    after: dict[str, float]  # ... and of the logits divided by the temperature

    def metrics(self) -> dict[str, float]:
        """What the train stage logs: `calibration.temperature`, `calibration.val_ece_before`, ..."""
        flat = {"calibration.temperature": self.temperature}
        for when, values in (("before", self.before), ("after", self.after)):
            flat.update({f"calibration.val_{key}_{when}": values[key] for key in ("ece", "nll")})
        return flat

    def line(self) -> str:
        return (
            f"calibration: temperature {self.temperature:.4f} fitted on {self.images} validation images; "
            f"ECE {self.before['ece']:.4f} -> {self.after['ece']:.4f}, "
            f"NLL {self.before['nll']:.4f} -> {self.after['nll']:.4f}"
        )


def calibrate(model: ImageClassifier, val: Split) -> Calibration | str:
    """Fit `model`'s temperature on `val` (uint8 images on the model's device) and set it, in place. Or, with
    temperature 1, the reason it cannot be fitted: `val` is empty or too small, or the model gets every image of
    it right."""
    model.set_temperature(1.0)  # fit on the raw logits, whatever the model held before
    if len(val) == 0:
        return "the validation split is empty (preprocess.val_size: 0)"
    if len(val) < MIN_CALIBRATION_IMAGES:
        return f"{len(val)} validation images are too few to fit it on (it takes {MIN_CALIBRATION_IMAGES})"
    # float32 without autocast, as evaluate scores the model: the temperature fits the logits that get used.
    logits = split_logits(model, val, inference_batch_size(next(model.parameters()).device))
    if bool((logits.argmax(dim=1) == val.labels).all()):
        # Without a single mistake, sharper is always likelier: the fit would drive T to its lower bound and
        # make every answer ~100% sure (seen on a 14-image validation split of a 180-photo folder).
        return f"the model gets all {len(val)} validation images right, so there is no mistake to fit it on"
    temperature = fit_temperature(logits, val.labels)
    model.set_temperature(temperature)
    return Calibration(
        temperature=temperature,
        images=len(val),
        before=calibration_metrics(logits, val.labels),
        after=calibration_metrics(logits / temperature, val.labels),
    )


def calibrated_state(
    config: dict[str, Any], state: dict[str, torch.Tensor], val: Split, enabled: bool
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The train stage's step after training: `state` (the best weights, on the CPU) with a temperature fitted
    on `val` when `enabled` and `val` has images, and the metrics to log. Prints one line saying which.

    It runs on the CPU whatever trained the model, so the fitted temperature does not depend on the device."""
    model = build_model(config)
    model.load_state_dict(state)
    if not enabled:
        print("calibration off (train.calibrate: false): temperature 1")
        return model.state_dict(), {"calibration.temperature": 1.0}
    found = calibrate(model, val)
    if isinstance(found, str):
        print(f"calibration skipped: {found}; temperature 1")
        return model.state_dict(), {"calibration.temperature": 1.0}
    print(found.line())
    return model.state_dict(), found.metrics()
