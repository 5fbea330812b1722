"""Any image folder works with the defaults: each run below sets data.dataset and data.path and nothing else.

Folders of 2, 3 and 20 classes, from 60-odd to 2,000 images, grey and colour, unbalanced 10:1, mixed sizes and
formats: the whole pipeline completes on each, and learns (the 3-class shapes folder to at least 0.95).
"""

import json
from pathlib import Path

import pytest
from conftest import copy_repo, default_params, run, write_params
from image_folders import FORMATS, VARIANTS, shape_classes, shapes_folder
from test_pipeline import STAGES, repro

pytestmark = pytest.mark.slow

FOLDERS = {
    # The example: 3 easy classes, 60 square images each, shapes of random colour, place and size.
    "shapes": ({"size_range": (64, 64)}, 0.95),
    "grey-unbalanced": ({"per_class": [300, 30], "classes": ("circle", "star"), "grey": 1.0}, 0.8),
    "twenty-mixed": (
        {
            "per_class": 100,
            "classes": shape_classes(20),
            "formats": FORMATS,
            "odd": len(VARIANTS),
            "grey": 0.3,
        },
        0.3,  # chance is 0.05
    ),
}


def pipeline_on(folder: Path, repo: Path) -> dict:
    raw = default_params()
    raw["data"].update(dataset="folder", path=str(folder))
    write_params(repo, raw)
    assert repro(repo) == dict.fromkeys(STAGES, "ran")
    return raw


@pytest.mark.parametrize("name", list(FOLDERS))
def test_the_defaults_work_on_any_folder(name: str, tmp_path: Path) -> None:
    options, least_accuracy = FOLDERS[name]
    folder = shapes_folder(tmp_path / "images", **options)
    repo = copy_repo(tmp_path / "repo")
    pipeline_on(folder, repo)

    meta = json.loads((repo / "data/processed/meta.json").read_text())
    classes = options.get("classes", ("circle", "square", "triangle"))
    assert meta["classes"] == sorted(classes)
    assert meta["image_shape"][0] == (1 if options.get("grey") == 1.0 else 3)
    assert min(meta["sizes"].values()) >= len(classes)  # every split holds every class at least once
    accuracy = json.loads((repo / "reports/evaluate/metrics.json").read_text())["accuracy"]
    assert accuracy >= least_accuracy
    export = json.loads((repo / "reports/export/metrics.json").read_text())
    assert export["onnx_max_abs_logit_diff"] <= 1e-4
    image = next((folder / classes[0]).iterdir())
    assert f'{image}: Predicted: "' in run(["predict", str(image)], cwd=repo).stdout
