"""Golden hashes of training: five configurations whose final weights, kept weights and history must not change
when the training core is reorganised.

Bit-identical results hold on one machine type only (the kernels differ between AVX2, AVX-512 and AMX), so the
hashes are stored per machine type. On a machine type with no recorded hashes the test still checks the numbers:
every case runs in fp32 and its validation losses and weight norms must match a recorded machine's closely.

Record (only when a change is *meant* to alter training): GOLDEN_RECORD=1 pytest tests/test_golden.py
"""

import hashlib
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_MODEL_CONFIG, learnable_images

from image_classifier import backbones
from image_classifier.data import Split, save_split
from image_classifier.device import cpu_has_amx
from image_classifier.train import TrainResult, train

GOLDEN_FILE = Path(__file__).parent / "golden" / "training.json"
# Across machine types fp32 kernels sum in different orders: a few epochs on tiny data stay this close.
CROSS_MACHINE_TOLERANCE = 1e-3


def machine_type() -> str:
    amx = "amx" if cpu_has_amx() else "noamx"
    return f"torch-{torch.__version__}-{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}-{amx}"


def split(size: int, seed: int, channels: int = 1) -> Split:
    labels = torch.arange(size) % 10
    images = learnable_images(labels, seed).unsqueeze(1)
    return Split(images.expand(-1, channels, -1, -1).contiguous(), labels)


def timm_config() -> dict[str, Any]:
    model = "timm:test_resnet"
    return {
        **TINY_MODEL_CONFIG,
        "model": model,
        "width": 0,
        "image_shape": [3, 28, 28],
        "mean": [0.2] * 3,
        "std": [0.3] * 3,
        "model_kwargs": backbones.model_kwargs(model, 28),
    }


def run_case(case: str, tiny_params, folder: Path) -> TrainResult:
    base = tiny_params.train.model_copy(update={"epochs": 3, "precision": "fp32"})
    cpu, checkpoint = torch.device("cpu"), folder / "resume.pt"
    train_split, val_split = split(300, 1), split(100, 2)
    if case == "cnn":
        return train(base, TINY_MODEL_CONFIG, train_split, val_split, cpu, checkpoint)
    if case == "convnet-ema-mixup-balanced-cosine":
        params = base.model_copy(
            update={
                "ema": True,
                "mixup": 0.4,
                "class_weights": "balanced",
                "schedule": "cosine",
                "flip": True,
            }
        )
        config = {**TINY_MODEL_CONFIG, "model": "convnet", "width": 8}
        return train(params, config, train_split, val_split, cpu, checkpoint)
    if case == "timm-frozen-first-epoch":
        params = base.model_copy(update={"freeze_epochs": 1, "backbone_lr_scale": 0.1, "augment": "photo"})
        return train(params, timm_config(), split(300, 1, 3), split(100, 2, 3), cpu, checkpoint)
    if case == "streamed":
        for name, data in (("train", train_split), ("val", val_split)):
            save_split(data, folder / name, shard_bytes=40 * 28 * 28)
        from image_classifier.data import load_split

        params = base.model_copy(update={"data_in_memory": False, "crop_padding": 2})
        stored = load_split(folder / "train"), load_split(folder / "val")
        return train(params, TINY_MODEL_CONFIG, *stored, cpu, checkpoint)
    if case == "resumed":

        def interrupt_after_first_epoch(stats: dict[str, float]) -> None:
            if stats["epoch"] == 1:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            train(
                base, TINY_MODEL_CONFIG, train_split, val_split, cpu, checkpoint, interrupt_after_first_epoch
            )
        return train(base, TINY_MODEL_CONFIG, train_split, val_split, cpu, checkpoint)
    raise ValueError(case)


CASES = ["cnn", "convnet-ema-mixup-balanced-cosine", "timm-frozen-first-epoch", "streamed", "resumed"]
TIMING = {"epoch_seconds", "samples_per_second"}


def summary(result: TrainResult) -> dict[str, Any]:
    """An exact hash of the final weights, the kept weights and the history, and numbers to compare across
    machine types."""
    digest = hashlib.sha256()
    for state in (result.final_checkpoint["model"], result.best_state):
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].cpu().contiguous().numpy().tobytes())
    history = [{k: v for k, v in row.items() if k not in TIMING} for row in result.history]
    digest.update(json.dumps([history, result.best_epoch], sort_keys=True).encode())
    floats = [v.double() for v in result.final_checkpoint["model"].values() if v.is_floating_point()]
    return {
        "sha256": digest.hexdigest(),
        "val_loss": [row["val_loss"] for row in result.history],
        "weight_norm": math.sqrt(sum(float((v**2).sum()) for v in floats)),
    }


def recorded() -> dict[str, dict[str, Any]]:
    return json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}


@pytest.mark.parametrize("case", CASES)
def test_training_matches_its_golden_hashes(case: str, tiny_params, tmp_path: Path) -> None:
    got = summary(run_case(case, tiny_params, tmp_path))
    golden, machine = recorded(), machine_type()
    if os.environ.get("GOLDEN_RECORD"):
        golden.setdefault(machine, {})[case] = got
        GOLDEN_FILE.parent.mkdir(exist_ok=True)
        GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    if case in golden.get(machine, {}):
        assert got["sha256"] == golden[machine][case]["sha256"], f"{case} trains differently on {machine}"
        return
    others = [entry[case] for entry in golden.values() if case in entry]
    assert others, f"no golden numbers for {case}: record them with GOLDEN_RECORD=1"
    want = others[0]
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=CROSS_MACHINE_TOLERANCE)
    assert got["weight_norm"] == pytest.approx(want["weight_norm"], rel=CROSS_MACHINE_TOLERANCE)
