"""The whole pipeline with `train.model: timm:resnet18` on small folders: weights from a local file, and from a
URL served on 127.0.0.1; grey images into a 3-channel architecture; ONNX parity, predict on a JPEG, MLflow.

Random ResNet-18 weights, saved the way timm publishes them, stand in for ImageNet's (no internet here); what is
tested is the plumbing (download, checksum, loading, adaptation, fine-tuning schedule, export), not accuracy.
"""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import timm
import torch
from conftest import copy_repo, default_params, run, write_params
from image_folders import shapes_folder
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import save_file
from test_pipeline import STAGES, repro

pytestmark = pytest.mark.slow


def resnet18_weights(path: Path) -> str:
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fine_tune(tmp_path: Path, folder: Path, pretrained: str, **train: object) -> Path:
    repo = copy_repo(tmp_path / "repo")
    raw = default_params()
    raw["data"].update(dataset="folder", path=str(folder), image_size=48)
    raw["train"].update(model="timm:resnet18", pretrained=pretrained, epochs=3, **train)
    write_params(repo, raw)
    assert repro(repo) == dict.fromkeys(STAGES, "ran")
    return repo


def the_run(repo: Path) -> mlflow.entities.Run:
    uri = f"sqlite:///{repo}/mlruns/mlflow.db"
    run_id = json.loads((repo / "reports/train/mlflow_run.json").read_text())["run_id"]
    return MlflowClient(uri).get_run(run_id)


def test_fine_tune_from_a_local_file_through_every_stage(tmp_path: Path) -> None:
    folder = shapes_folder(tmp_path / "images", per_class=40, size_range=(40, 90))
    sha256 = resnet18_weights(tmp_path / "resnet18.safetensors")
    repo = fine_tune(tmp_path, folder, str(tmp_path / "resnet18.safetensors"))

    export = json.loads((repo / "reports/export/metrics.json").read_text())
    assert export["onnx_max_abs_logit_diff"] <= 1e-4
    assert (repo / "models/export/model.pt2").is_file()
    photo = tmp_path / "photo.jpg"  # any size: predict resizes as preprocess did
    Image.open(next((folder / "circle").iterdir())).convert("RGB").resize((333, 217)).save(photo)
    assert f'{photo}: Predicted: "' in run(["predict", str(photo)], cwd=repo).stdout

    result = the_run(repo)
    assert result.data.tags["pretrained.sha256"] == sha256
    assert result.data.tags["pretrained.source"] == str(tmp_path / "resnet18.safetensors")
    assert result.data.params["train.model"] == "timm:resnet18"
    resolved = {key: result.data.params[f"resolved.{key}"] for key in ("freeze_epochs", "backbone_lr_scale")}
    assert resolved == {"freeze_epochs": "0", "backbone_lr_scale": "1.0"}  # fine-tuning's auto (plan.py)
    assert result.data.params["resolved.optimizer"] == "adamw"
    config = json.loads((repo / "models/export/config.json").read_text())
    assert config["mean"] == list(timm.models.get_pretrained_cfg("resnet18").mean)  # the weights' statistics

    # The registered model, through MLflow's generic loader, takes 0..1 floats like every model of ours.
    store = f"sqlite:///{repo}/mlruns/mlflow.db"
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)  # an earlier test in this process may have set another
    model = mlflow.pyfunc.load_model("models:/images-classifier@champion")
    logits = model.predict(np.random.default_rng(0).random((2, 3, 48, 48), dtype=np.float32))
    assert np.asarray(logits).shape == (2, 3)


def test_grey_images_fine_tune_a_colour_architecture_from_a_served_file(
    tmp_path: Path, server: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, served = server.url, server.root
    sha256 = resnet18_weights(tmp_path / "w.safetensors")
    name = f"resnet18-{sha256[:8]}.safetensors"  # torch.hub's convention: the hash prefix in the name
    (served / name).write_bytes((tmp_path / "w.safetensors").read_bytes())
    monkeypatch.setenv("IMAGE_CLASSIFIER_CACHE", str(tmp_path / "cache"))
    folder = shapes_folder(tmp_path / "images", per_class=[40, 30], classes=("circle", "star"), grey=1.0)
    # fp32: bf16 on an AMX CPU gave NaNs now and then for ResNet's 1x1 last stage on such small images.
    repo = fine_tune(tmp_path, folder, f"{base}/{name}", precision="fp32", freeze_epochs=2)

    assert json.loads((repo / "data/processed/meta.json").read_text())["image_shape"][0] == 1
    assert (tmp_path / "cache/torch" / name).is_file()
    result = the_run(repo)
    assert (result.data.tags["pretrained.source"], result.data.tags["pretrained.sha256"]) == (
        f"{base}/{name}",
        sha256,
    )
    assert result.data.params["resolved.freeze_epochs"] == "2"
    export = json.loads((repo / "reports/export/metrics.json").read_text())
    assert export["onnx_max_abs_logit_diff"] <= 1e-4
