"""Evaluate's metrics, the export formats, and `predict` on image files."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import CLASSES
from PIL import Image
from test_train import CONFIG, make_split

from image_classifier import export as export_module
from image_classifier import paths
from image_classifier.calibration import expected_calibration_error
from image_classifier.errors import UserError
from image_classifier.evaluate import classification_metrics, confusion_matrix, flat_metrics
from image_classifier.export import (
    example_input,
    export_onnx,
    export_program,
    load_model,
    onnx_parity,
    parity_failure,
    parity_metrics,
    save_model,
)
from image_classifier.images import read_image
from image_classifier.models import build_model, predict_logits
from image_classifier.predict import main as predict_main


def test_metrics_on_known_predictions() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    metrics = classification_metrics(logits, labels, ["a", "b"])
    assert metrics["accuracy"] == 0.75
    assert confusion_matrix(labels, logits.argmax(1), 2).tolist() == [[1, 1], [0, 2]]
    assert metrics["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3)}
    assert metrics["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert flat_metrics(metrics, "test")["test_recall_a"] == 0.5


@pytest.fixture
def saved_model(tmp_path: Path) -> Path:
    model = build_model(CONFIG)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model.set_temperature(0.5)  # a calibrated model: every export must carry the temperature
    path = tmp_path / "model.pt"
    save_model(path, CONFIG, model.state_dict())
    return path


def test_the_export_check_compares_onnx_with_evaluates_logits_on_an_even_sample(
    saved_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(export_module, "PARITY_IMAGES", 10)
    model, config = load_model(saved_model)
    for path in (paths.ONNX_FILE, paths.EXPORT_METRICS, paths.TEST_LOGITS):
        path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, example_input(config), paths.ONNX_FILE, opset=18)
    test = make_split(37, 3)
    export_module.save_test_logits(paths.TEST_LOGITS, predict_logits(model, test.images, 16), saved_model)
    reference = export_module.load_test_logits(paths.TEST_LOGITS, saved_model, len(test))
    parity = export_module.check_onnx(reference, test, max_logit_diff=1e-3)
    assert parity["onnx_checked_images"] == 10 and parity["onnx_prediction_agreement"] == 1.0
    assert json.loads(paths.EXPORT_METRICS.read_text()) == parity
    # A reference off by a logit on the last image (one the even sample takes): a mismatch, and no metrics.
    paths.EXPORT_METRICS.unlink()
    reference[-1, 0] += 1.0
    with pytest.raises(UserError, match="ONNX logits differ from PyTorch's by"):
        export_module.check_onnx(reference, test, max_logit_diff=1e-3)
    assert not paths.EXPORT_METRICS.exists()


def test_test_logits_of_another_model_or_split_are_refused(saved_model: Path, tmp_path: Path) -> None:
    logits = tmp_path / "test_logits.npz"
    with pytest.raises(UserError, match=r"test_logits\.npz does not exist: run the evaluate stage first"):
        export_module.load_test_logits(logits, saved_model, 3)
    export_module.save_test_logits(logits, torch.zeros(3, 3), saved_model)
    with pytest.raises(UserError, match="has 3 rows but the test split 4 images"):
        export_module.load_test_logits(logits, saved_model, 4)
    other = tmp_path / "other.pt"
    other.write_bytes(saved_model.read_bytes() + b"\0")
    with pytest.raises(UserError, match=r"holds the test logits of another .*other\.pt than this one"):
        export_module.load_test_logits(logits, other, 3)
    logits.write_bytes(b"not numpy")
    with pytest.raises(UserError, match=r"cannot read .*test_logits\.npz"):
        export_module.load_test_logits(logits, saved_model, 3)


def test_onnx_and_torch_export_match_pytorch(saved_model: Path, tmp_path: Path) -> None:
    model, config = load_model(saved_model)
    assert model.temperature.item() == 0.5  # so parity below also checks that the exports divide by it
    example = example_input(config)
    export_onnx(model, example, tmp_path / "model.onnx", opset=18)
    split = make_split(37, 3)
    parity = onnx_parity(tmp_path / "model.onnx", model, split.images, batch_size=16, labels=split.labels)
    assert parity["onnx_max_abs_logit_diff"] <= 1e-4
    assert parity["onnx_prediction_agreement"] == 1.0
    assert parity["onnx_checked_images"] == 37
    probabilities = predict_logits(model, split.images, 16).softmax(dim=1)
    assert parity["onnx_test_ece"] == pytest.approx(
        expected_calibration_error(probabilities, split.labels), abs=1e-4
    )

    export_program(model, example, tmp_path / "model.pt2")
    program = torch.export.load(tmp_path / "model.pt2")
    batch = torch.rand(5, 1, 28, 28)  # another batch size than the example: the batch is dynamic
    torch.testing.assert_close(program.module()(batch), model(batch))


def test_unreadable_model_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"cannot load model file .*bad.pt"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_predict_classifies_png_files(saved_model: Path, tmp_path: Path, capsys) -> None:
    model, _ = load_model(saved_model)
    image = make_split(10, 4).images[3]
    Image.fromarray(image[0].numpy()).resize((56, 56)).convert("RGB").save(tmp_path / "big.png")
    loaded = read_image(tmp_path / "big.png", 1, (28, 28))
    assert loaded.shape == (1, 28, 28) and loaded.dtype == torch.uint8
    expected = CLASSES[int(model(loaded[None].float() / 255).argmax())]
    predict_main([str(tmp_path / "big.png"), "--model", str(saved_model)])
    assert f'Predicted: "{expected}" (' in capsys.readouterr().out


def test_predict_top_prints_k_classes_sorted_by_calibrated_probability(
    saved_model: Path, tmp_path: Path, capsys
) -> None:
    model, _ = load_model(saved_model)
    image = make_split(10, 4).images[3]
    Image.fromarray(image[0].numpy()).save(tmp_path / "shoe.png")
    probabilities = model(image[None].float() / 255).softmax(dim=1)[0]  # eval mode: divided by temperature
    predict_main([str(tmp_path / "shoe.png"), "--model", str(saved_model), "--top", "3"])
    heading, *lines = capsys.readouterr().out.splitlines()
    assert heading == f"{tmp_path / 'shoe.png'}: top 3 of 10 classes"
    assert len(lines) == 3
    shown = [re.fullmatch(r'  (\d)\. "(\w+)" \(([\d.]+)%\)', line).groups() for line in lines]
    assert [rank for rank, _, _ in shown] == ["1", "2", "3"]
    percents = [float(percent) for _, _, percent in shown]
    assert percents == sorted(percents, reverse=True)
    expected = probabilities.topk(3)
    assert [name for _, name, _ in shown] == [CLASSES[i] for i in expected.indices]
    assert percents == [round(100 * p, 1) for p in expected.values.tolist()]

    predict_main([str(tmp_path / "shoe.png"), "--model", str(saved_model)])  # the default stays one line
    (line,) = capsys.readouterr().out.splitlines()
    assert line.endswith(f'Predicted: "{shown[0][1]}" ({shown[0][2]}%)')


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.png", None, "no such file"),
        ("notes.png", b"hello, not an image", "not an image file"),
        ("cut.png", "truncated", "corrupt or truncated"),
        ("bomb.png", "bomb", "too large"),
    ],
)
def test_predict_refuses_bad_images(tmp_path: Path, name: str, content, message: str) -> None:
    path = tmp_path / name
    if content == "truncated":
        Image.new("L", (64, 64), 128).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif content == "bomb":
        Image.new("1", (8000, 6000)).save(path)  # 48 Mpixels, a few KB on disk
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_image(path, 1, (28, 28))


def test_sample_mosaic_matches_torchvision_make_grid() -> None:
    from torchvision.utils import make_grid

    from image_classifier.plots import _mosaic

    for channels in (1, 3):
        images = torch.randint(0, 256, (7, channels, 10, 12), dtype=torch.uint8)
        expected = make_grid(images, nrow=3, padding=4, pad_value=255).permute(1, 2, 0)
        assert torch.equal(_mosaic(images, 3, 4), expected)


def test_parity_judges_logits_relative_to_their_scale() -> None:
    """Float noise passes at any logit scale (EfficientNet-Lite0's ImageNet logits reach ~12, its ONNX gap 2e-5);
    a 1% change of the model (a real mismatch) fails, as does a gap that is small in logits but moves
    probabilities."""
    import numpy as np

    rng = np.random.default_rng(0)
    reference = rng.normal(0, 6, (50, 10)).astype(np.float32)
    noise = reference + rng.normal(0, 2e-5, reference.shape).astype(np.float32)
    assert parity_failure(parity_metrics(reference, noise), 1e-3) is None
    assert parity_metrics(reference, noise)["onnx_max_abs_logit_diff"] > 1e-5  # the old 1e-4 was this close
    wrong = reference * 1.01
    failure = parity_failure(parity_metrics(reference, wrong), 1e-3)
    assert failure and failure.startswith("ONNX logits differ from PyTorch's by")
    tiny = np.zeros((4, 3), np.float32)  # an untrained model: logits near 0, scale floored at 1
    assert parity_failure(parity_metrics(tiny, tiny + 5e-3), 1e-3).startswith("ONNX logits differ")


def test_a_prediction_flips_only_on_a_tie_within_the_tolerance() -> None:
    """A flip needs a gap of half PyTorch's top-two margin: bounded gaps allow flips on near-ties only."""
    import numpy as np

    reference = np.array([[3.0, 1.0, 0.0], [2.0, 2.0 + 5e-6, 0.0]], np.float32)
    tie_flipped = reference.copy()
    tie_flipped[1] = [2.0 + 5e-6, 2.0, 0.0]
    parity = parity_metrics(reference, tie_flipped)
    assert (parity["onnx_prediction_agreement"], parity["onnx_disagreements"]) == (0.5, 1)
    assert parity["onnx_max_flipped_margin"] < 2e-6 and parity_failure(parity, 1e-3) is None
    clear_flip = parity_metrics(reference, reference[:, [1, 0, 2]])
    assert clear_flip["onnx_max_flipped_margin"] == pytest.approx(2 / 3)
    assert parity_failure(clear_flip, 1e-3).startswith("ONNX logits differ from PyTorch's by 6.67e-01")
