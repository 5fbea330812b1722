"""Where batches come from (issue 14): streamed from mapped shards, training gives the same weights bit for bit
as with the split in memory; `auto` picks by size; a 2-process DDP run streams."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL_CONFIG, copy_repo, default_params, learnable_images, run
from image_folders import shapes_folder

from image_classifier import batches
from image_classifier.batches import Streamed, choose_mode, prefetched
from image_classifier.data import Split, load_split, save_split
from image_classifier.train import train


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def stored_split(folder: Path, size: int, seed: int) -> Split:
    """A learnable split stored in shards of 40 images (28×28 grey): several shards, read mapped."""
    labels = torch.arange(size) % 10
    save_split(Split(learnable_images(labels, seed).unsqueeze(1), labels), folder, shard_bytes=40 * 28 * 28)
    return load_split(folder)


def test_streamed_training_gives_the_in_memory_weights_bit_for_bit(
    tiny_params, tmp_path: Path, capsys
) -> None:
    train_split, val_split = stored_split(tmp_path / "train", 300, 1), stored_split(tmp_path / "val", 100, 2)
    assert len(list((tmp_path / "train").glob("images-*.npy"))) == 8
    # Translation and flips too: the augmentation draws must come out the same.
    params = tiny_params.train.model_copy(update={"epochs": 2, "crop_padding": 2, "flip": True})
    runs = {}
    for in_memory in (True, False):
        runs[in_memory] = train(
            params.model_copy(update={"data_in_memory": in_memory}),
            TINY_MODEL_CONFIG,
            train_split,
            val_split,
            torch.device("cpu"),
            tmp_path / f"{in_memory}.pt",
        )
    out = capsys.readouterr().out
    assert "training and validation images (314 kB) held in memory (train.data_in_memory: true)" in out
    assert "(314 kB) streamed from the mapped shards (train.data_in_memory: false)" in out
    memory, streamed = runs[True], runs[False]
    assert not streamed.data_mode.in_memory and memory.data_mode.in_memory
    assert state_hash(streamed.final_checkpoint["model"]) == state_hash(memory.final_checkpoint["model"])
    assert state_hash(streamed.best_state) == state_hash(memory.best_state)
    strip = ("epoch_seconds", "samples_per_second")
    for a, b in zip(streamed.history, memory.history, strict=True):
        assert {k: v for k, v in a.items() if k not in strip} == {
            k: v for k, v in b.items() if k not in strip
        }


def test_auto_holds_the_data_in_memory_when_it_fits_in_the_stated_share(monkeypatch, tmp_path: Path) -> None:
    split = stored_split(tmp_path / "s", 100, 1)  # 78.4 kB
    cpu = torch.device("cpu")
    monkeypatch.setattr(batches, "free_memory", lambda device: 1_000_000)
    mode = choose_mode("auto", [split], cpu)
    assert mode.in_memory
    assert mode.line == (
        "training and validation images (78.4 kB) held in memory (train.data_in_memory auto: 78.4 kB fits in "
        "50% of the 1 MB free on cpu)"
    )
    mode = choose_mode("auto", [split], cpu, processes=8)  # on a CPU each process holds its own copy
    assert not mode.in_memory and "(627 kB) streamed" not in mode.line
    assert "78.4 kB x 8 processes does not fit in 50% of the 1 MB free on cpu" in mode.line
    monkeypatch.setattr(batches, "free_memory", lambda device: 100_000)
    assert not choose_mode("auto", [split], cpu).in_memory
    assert choose_mode(True, [split], cpu).in_memory  # asked for: held even when it does not fit


def test_the_reader_thread_passes_errors_on_and_stops_when_left(tmp_path: Path) -> None:
    def read(job: int) -> int:
        if job == 3:
            raise OSError("disk gone")
        return job * 10

    with pytest.raises(OSError, match="disk gone"):
        list(prefetched(iter(range(5)), read))
    taken = []
    for value in prefetched(iter(range(1000)), lambda job: job):
        taken.append(value)
        if value == 2:
            break  # the thread stops; nothing hangs
    assert taken == [0, 1, 2]
    split = stored_split(tmp_path / "s", 90, 1)
    logits_source = Streamed(split, torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    assert torch.equal(logits_source.logits(model, 32), model(split.images.load().float() / 255))


@pytest.mark.slow
def test_two_ddp_processes_stream_to_the_in_memory_weights(tmp_path: Path) -> None:
    """train.processes: 2 (gloo on the CPU) with the data streamed: each process reads its share of each batch
    from the mapped shards, and the model is the one the same run gives with the data in memory."""
    repo = copy_repo(tmp_path / "repo")
    shapes_folder(repo / "data/images", per_class=40, size_range=(10, 30))
    raw = default_params()
    raw["data"].update(dataset="folder", image_size=16)
    raw["preprocess"].update(shard_mb=0.01)
    raw["train"].update(epochs=2, width=4, batch_size=16, device="cpu", processes=2, calibrate=False)
    weights = {}
    for in_memory in (True, False):
        raw["train"]["data_in_memory"] = in_memory
        (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        if in_memory:
            for stage in ("fetch", "preprocess"):
                run([sys.executable, f"stages/{stage}.py"], cwd=repo)
            assert len(list((repo / "data/processed/train").glob("images-*.npy"))) > 3
        output = run([sys.executable, "stages/train.py"], cwd=repo).stdout
        assert "2 processes" in output
        assert ("held in memory" if in_memory else "streamed from the mapped shards") in output
        weights[in_memory] = state_hash(torch.load(repo / "models/model.pt", weights_only=True)["state_dict"])
    assert weights[False] == weights[True]
    assert json.loads((repo / "reports/train/metrics.json").read_text())["epochs_trained"] == 2
