"""`predict` over folders (issue 26), without a pipeline: which files, in which order, decoded how, written how,
and the same answers from the .pt and the .onnx. The pipeline's models and the registry: test_predict_pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from predict_helpers import UNREADABLE, read_csv, write_mixed_tree
from test_train import CONFIG

from image_classifier.batch_predict import decode_iter
from image_classifier.errors import UserError
from image_classifier.export import example_input, export_onnx, load_model, onnx_metadata, save_model
from image_classifier.image_files import find_inputs
from image_classifier.images import read_image
from image_classifier.models import build_model
from image_classifier.predict import main as predict_main
from image_classifier.predictors import load_predictor


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A calibrated tiny model as a .pt and as an .onnx with its class names in its metadata."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = build_model(CONFIG)
    model.set_temperature(0.7)
    save_model(folder / "model.pt", CONFIG, model.state_dict())
    loaded, config = load_model(folder / "model.pt")
    export_onnx(
        loaded, example_input(config), folder / "model.onnx", opset=18, metadata=onnx_metadata(config)
    )
    return {"pt": folder / "model.pt", "onnx": folder / "model.onnx"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("tree") / "photos"
    return root, write_mixed_tree(root, 60)


def predict_exit(args: list[str]) -> int:
    """predict's exit status, run in this process."""
    try:
        predict_main(args)
    except SystemExit as stop:
        return int(stop.code)
    return 0


# --- Which files, in which order ------------------------------------------------------------------------------


def test_folders_are_searched_recursively_in_sorted_order_skipping_non_images(tree) -> None:
    root, expected = tree
    assert [str(path) for path in find_inputs([str(root)])] == expected
    (root / ".hidden").mkdir(exist_ok=True)
    (root / ".hidden" / "x.png").write_bytes(b"")
    assert [str(path) for path in find_inputs([str(root)])] == expected, "hidden folders are skipped"


def test_files_patterns_and_folders_combine_in_argument_order_without_repeats(tree) -> None:
    root, expected = tree
    bmp = sorted(path for path in expected if path.endswith(".bmp"))
    named = str(root / "batch0" / "README.txt")  # named explicitly: taken whatever its suffix
    found = [str(path) for path in find_inputs([named, f"{root}/**/*.bmp", str(root)])]
    assert found[0] == named and found[1 : 1 + len(bmp)] == bmp
    assert found[1 + len(bmp) :] == [path for path in expected if path not in bmp]


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("missing.png", r"missing.png: no such file or folder"),
        ("empty", r"empty: no image files in this folder"),
        ("nothing/*.png", r"nothing/\*.png: no files match this pattern"),
    ],
)
def test_paths_that_name_no_image_are_usage_errors(tmp_path: Path, monkeypatch, argument, message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=message):
        find_inputs([argument])


# --- Decoding --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 3])
def test_decoding_keeps_order_and_gives_read_image_pixels_or_the_error(tree, workers: int) -> None:
    _, files = tree
    paths = [Path(path) for path in files]
    decoded = list(decode_iter(paths, 1, 28, workers))
    assert [position for position, _, _ in decoded] == list(range(len(paths)))
    for (_, array, error), path in zip(decoded, paths, strict=True):
        if "broken" in path.parts:  # where write_mixed_tree puts the UNREADABLE files
            assert array is None and error and not error.startswith(str(path)), (path, error)
        else:
            assert error is None and np.array_equal(array, read_image(path, 1, (28, 28)).numpy()), path


# --- Output files ----------------------------------------------------------------------------------------------


def test_csv_has_one_row_per_file_errors_marked_and_the_same_answers_from_pt_and_onnx(
    models, tree, tmp_path: Path, capsys
) -> None:
    root, files = tree
    outputs = {}
    for kind, model in models.items():
        outputs[kind] = tmp_path / f"{kind}.csv"
        status = predict_exit([str(root), "--model", str(model), "--out", str(outputs[kind]), "--top", "3"])
        assert status == 1, "some files could not be read"
        stderr = capsys.readouterr().err
        assert all(name.split("/")[-1] in stderr for name in UNREADABLE), stderr
    pt, onnx = read_csv(outputs["pt"]), read_csv(outputs["onnx"])
    assert [row["path"] for row in pt] == files == [row["path"] for row in onnx]
    failed = {row["path"] for row in pt if row["error"]}
    assert (
        failed
        == {path for path in files if "/broken/" in path}
        == {row["path"] for row in onnx if row["error"]}
    )
    for a, b in zip(pt, onnx, strict=True):
        if a["error"]:
            assert a["predicted"] == a["probability"] == "" and "image" in a["error"]
            continue
        assert (
            a["predicted"] == b["predicted"] == a["top1_class"] and a["probability"] == a["top1_probability"]
        )
        probabilities = [float(a[f"top{k}_probability"]) for k in (1, 2, 3)]
        assert probabilities == sorted(probabilities, reverse=True)
        assert abs(float(a["probability"]) - float(b["probability"])) <= 1e-4


def test_csv_probabilities_are_the_models_softmax(models, tree, tmp_path: Path) -> None:
    _, files = tree
    good = next(path for path in files if "/broken/" not in path)
    assert predict_exit([good, "--model", str(models["pt"]), "--out", str(tmp_path / "one.csv")]) == 0
    (row,) = read_csv(tmp_path / "one.csv")
    model, _ = load_model(models["pt"])
    probabilities = model(read_image(Path(good), 1, (28, 28))[None].float() / 255).softmax(1)[0]
    values, indices = probabilities.topk(5)
    assert [row[f"top{k + 1}_class"] for k in range(5)] == [CONFIG["classes"][i] for i in indices]
    assert [float(row[f"top{k + 1}_probability"]) for k in range(5)] == pytest.approx(
        values.tolist(), abs=2e-6
    )


def test_jsonl_rows(models, tree, tmp_path: Path) -> None:
    root, files = tree
    assert predict_exit([str(root), "--model", str(models["onnx"]), "--out", str(tmp_path / "p.jsonl")]) == 1
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [row["path"] for row in rows] == files
    for row in rows:
        if row["error"]:
            assert row["predicted"] is None and row["probability"] is None and row["top"] == []
        else:
            assert row["predicted"] == row["top"][0]["class"] and len(row["top"]) == 5
            assert row["probability"] == row["top"][0]["probability"]


def test_a_failure_midway_leaves_no_file_and_the_old_one_intact(
    models, tree, tmp_path: Path, monkeypatch
) -> None:
    root, _ = tree
    out = tmp_path / "p.csv"
    out.write_text("yesterday's predictions\n")
    calls = []

    def failing_logits(predictor):
        def logits(images):
            calls.append(len(images))
            if len(calls) == 2:
                raise RuntimeError("out of memory")
            return predictor_logits(images)

        predictor_logits = predictor.logits
        predictor.logits = logits
        return predictor

    import image_classifier.predict as predict_module

    monkeypatch.setattr(predict_module, "load_predictor", lambda model: failing_logits(load_predictor(model)))
    with pytest.raises(RuntimeError, match="out of memory"):
        predict_main([str(root), "--model", str(models["pt"]), "--out", str(out), "--batch-size", "8"])
    assert len(calls) == 2 and out.read_text() == "yesterday's predictions\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["p.csv"], "no temporary file left"


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("predictions.txt", r"write predictions to a .csv or .jsonl file"),
        ("folder", r"--out folder is a folder"),
        ("file.csv/predictions.csv", r"--out file.csv/predictions.csv: cannot write there"),
    ],
)
def test_outputs_that_cannot_be_written_are_refused_before_any_work(
    models, tree, tmp_path: Path, monkeypatch, out: str, message: str
) -> None:
    root, _ = tree
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.csv").write_text("a file, not a folder\n")
    before = sorted(path.name for path in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=message):
        predict_main([str(root), "--model", str(models["pt"]), "--out", out])
    assert sorted(path.name for path in tmp_path.rglob("*")) == before


def test_every_file_unreadable_is_a_usage_error_with_no_output(models, tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(
        UserError, match=r"none of the 2 images could be read; the first: .*a.png: not an image"
    ):
        predict_main([str(tmp_path), "--model", str(models["pt"]), "--out", str(tmp_path / "p.csv")])
    assert not (tmp_path / "p.csv").exists()


# --- Models ----------------------------------------------------------------------------------------------------


def test_onnx_brings_its_classes_and_shape_and_old_exports_read_config_json(models, tmp_path: Path) -> None:
    predictor = load_predictor(str(models["onnx"]))
    assert predictor.classes == CONFIG["classes"] and predictor.image_shape == CONFIG["image_shape"]
    assert predictor.backend == "onnxruntime"
    old = tmp_path / "export" / "model.onnx"  # exported before the metadata existed: config.json beside it
    old.parent.mkdir()
    model, config = load_model(models["pt"])
    export_onnx(model, example_input(config), old, opset=18)
    with pytest.raises(UserError, match=r"does not name its classes .*export it again"):
        load_predictor(str(old))
    (old.parent / "config.json").write_text(json.dumps(config))
    assert load_predictor(str(old)).classes == CONFIG["classes"]


def test_missing_models_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model file .*nowhere.onnx does not exist"):
        load_predictor(str(tmp_path / "nowhere.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"cannot load ONNX model .*junk.onnx"):
        load_predictor(str(tmp_path / "junk.onnx"))
