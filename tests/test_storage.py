"""The stored split format (issue 14): shards of bounded size, read mapped, never unpickled; a folder decoded by
a pool of threads gives the same bytes as one thread; a killed preprocess leaves no partial shard under an
output's name; adding images to a folder leaves the earlier shards as they were (issue 25)."""

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, default_params, run
from image_folders import shapes_folder

from image_classifier import params as params_module
from image_classifier.data import Split, load_split, save_split
from image_classifier.errors import UserError
from image_classifier.folder import copy_image_folder, decode_folder
from image_classifier.folder_preprocess import preprocess_folder
from image_classifier.storage import MappedImages, read_split

HARNESS = Path(__file__).resolve().parent / "kill_during_write.py"
SPLITS = ("train", "val", "test")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every visible file under `folder` by relative path: what DVC would store as the output."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }


def stored(images: torch.Tensor, folder: Path, shard_bytes: int) -> Split:
    save_split(Split(images, torch.arange(len(images)) % 10), folder, shard_bytes)
    return load_split(folder)


def test_mapped_images_read_like_the_tensor_they_store(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (23, 2, 4, 4), dtype=torch.uint8)
    split = stored(images, tmp_path / "s", shard_bytes=5 * 32)  # five images a shard: five shards
    assert len(list((tmp_path / "s").glob("images-*.npy"))) == 5
    mapped = split.images
    assert (
        isinstance(mapped, MappedImages) and mapped.shape == (23, 2, 4, 4) and mapped.nbytes == images.numel()
    )
    index = torch.tensor([22, 0, 7, 7, 13, 4])  # across shards, out of order, repeated
    assert torch.equal(mapped[index], images[index])
    assert torch.equal(mapped[3:19], images[3:19]) and torch.equal(mapped[5], images[5])
    subset = split.subset(torch.tensor([20, 1, 9, 14])).subset(torch.tensor([3, 0]))
    assert torch.equal(subset.images[:], images[[14, 20]]) and subset.labels.tolist() == [4, 0]
    mapped.release()  # maps the files afresh: the same images
    assert torch.equal(mapped.load(), images)


def test_a_stored_split_loads_without_unpickling_and_names_damage(tmp_path: Path) -> None:
    stored(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), tmp_path / "s", shard_bytes=2 * 64)
    np.save(tmp_path / "s/labels.npy", np.array([{"code": "run me"}] * 4, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match=r"s cannot be loaded: Object arrays cannot be loaded"):
        load_split(tmp_path / "s")
    stored(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), tmp_path / "s", shard_bytes=2 * 64)
    shard = tmp_path / "s/images-00001.npy"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match=r"cannot be loaded: .*; restore it with 'dvc checkout preprocess'"):
        load_split(tmp_path / "s")
    (tmp_path / "s/images-00001.npy").unlink()
    with pytest.raises(UserError, match=r"2 images in its shards but 4 labels"):
        load_split(tmp_path / "s")
    with pytest.raises(UserError, match=r"nowhere is missing; run the preprocess stage first"):
        load_split(tmp_path / "nowhere")


def folder_params(**preprocess: object) -> params_module.PreprocessParams:
    return params_module.PreprocessParams(
        **{"val_size": 10, "test_size": 20, "train_subset": 0, "seed": 0, "shard_mb": 0.01, **preprocess}
    )


def test_a_folder_decodes_in_parallel_to_the_same_shards_as_one_thread(tmp_path: Path) -> None:
    root = shapes_folder(
        tmp_path / "images", per_class=40, size_range=(10, 30), grey=0.3, formats=("png", "jpg")
    )
    copy_image_folder(root, tmp_path / "raw")
    outputs = {}
    for workers in (1, 3):
        out = tmp_path / f"processed-{workers}"
        files = {name: out / name for name in SPLITS}
        preprocess_folder(
            tmp_path / "raw",
            16,
            "auto",
            folder_params(),
            files,
            out / "meta.json",
            tmp_path / "s.png",
            workers=workers,
        )
        outputs[workers] = snapshot(out)
    # 90 training images of 3×16×16 in shards of at most 10 kB (13 images): 7 shards.
    assert len([name for name in outputs[1] if name.startswith("train/images-")]) == 7
    assert outputs[3] == outputs[1]
    # The same images as the in-memory decoding of the folder.
    _, in_memory = decode_folder(tmp_path / "raw", 16, "auto")
    everything = torch.cat([load_split(tmp_path / "processed-3" / name).images[:] for name in SPLITS])
    assert everything.shape[1] == 3 and len(everything) == 120
    assert sorted(map(bytes, everything.flatten(1).numpy())) == sorted(
        map(bytes, in_memory["train"].images.flatten(1).numpy())
    )


def test_adding_one_percent_of_images_rewrites_few_shard_bytes(tmp_path: Path) -> None:
    # 1,000 images, then 10 more spread over every class: the earlier images keep their splits and shards,
    # the new ones go into new shards. At most 5% of the stored shard bytes may change (issue 25).
    shapes_folder(
        tmp_path / "images",
        per_class=250,
        classes=("circle", "square", "triangle", "star"),
        size_range=(12, 20),
    )
    params = folder_params(val_size="auto", test_size="auto", shard_mb=0.02)  # 26 images a shard
    out = tmp_path / "processed"
    files = {name: out / name for name in SPLITS}

    def preprocess_into() -> dict[str, bytes]:
        copy_image_folder(tmp_path / "images", tmp_path / "raw")
        preprocess_folder(tmp_path / "raw", 16, 3, params, files, out / "meta.json", tmp_path / "s.png")
        return {name: data for name, data in snapshot(out).items() if "/images-" in name}

    before = preprocess_into()
    more = shapes_folder(
        tmp_path / "more",
        per_class=[3, 3, 2, 2],
        classes=("circle", "square", "triangle", "star"),
        seed=7,
        size_range=(12, 20),
    )
    for path in more.rglob("*.png"):
        path.rename(tmp_path / "images" / path.parent.name / f"new-{path.name}")
    after = preprocess_into()

    unchanged = {data for data in before.values()} & {data for data in after.values()}
    rewritten = sum(len(data) for data in after.values() if data not in unchanged)
    assert len(before) >= 30
    assert rewritten <= 0.05 * sum(len(data) for data in before.values()), (
        f"{rewritten} of {sum(len(d) for d in before.values())} shard bytes rewritten"
    )
    sizes = {name: len(load_split(out / name)) for name in SPLITS}
    assert sum(sizes.values()) == 1010 and sizes["test"] == 202 and sizes["val"] == 81


def test_split_shares_stay_within_one_image_of_exact_per_class(tmp_path: Path) -> None:
    shapes_folder(tmp_path / "images", per_class=[53, 31, 16], size_range=(8, 10))
    copy_image_folder(tmp_path / "images", tmp_path / "raw")
    out = tmp_path / "processed"
    files = {name: out / name for name in SPLITS}
    params = folder_params(val_size=0.1, test_size=0.2)
    preprocess_folder(tmp_path / "raw", 8, 1, params, files, out / "meta.json", tmp_path / "s.png")
    test = torch.bincount(load_split(out / "test").labels, minlength=3).tolist()
    assert all(abs(got - 0.2 * n) <= 1 for got, n in zip(test, [53, 31, 16], strict=True)), test
    index = (out / "train/index.csv").read_text().splitlines()
    assert index[0] == "filename,label,shard,seed" and len(index) - 1 == len(load_split(out / "train"))


@pytest.mark.parametrize("validation", ["val", "valid", "validation"])
def test_a_folders_own_validation_split_is_kept_and_the_test_split_drawn_from_train(
    tmp_path: Path, validation: str, capsys
) -> None:
    """train/ and valid/ (a Roboflow export), or val/ (Ultralytics, torchvision): that folder is the validation
    split, image for image, and the test split is held out of train/ as preprocess.test_size says."""
    two = ("circle", "square")
    shapes_folder(tmp_path / "images" / "train", per_class=[20, 20], classes=two, size_range=(8, 10))
    shapes_folder(tmp_path / "images" / validation, per_class=[3, 4], classes=two, size_range=(8, 10), seed=7)
    copy_image_folder(tmp_path / "images", tmp_path / "raw")
    assert "(train 40, val 7)" in capsys.readouterr().out
    out = tmp_path / "processed"
    files = {name: out / name for name in SPLITS}
    preprocess_folder(
        tmp_path / "raw",
        8,
        1,
        folder_params(val_size=20, test_size=10),
        files,
        out / "meta.json",
        tmp_path / "s.png",
    )
    assert "val: the folder's own 7 images (preprocess.val_size is not used)" in capsys.readouterr().out
    sizes = {name: len(load_split(out / name)) for name in SPLITS}
    assert sizes == {"train": 30, "val": 7, "test": 10}
    stored = (out / "val/index.csv").read_text().splitlines()[1:]
    assert all(line.startswith(f"images/{validation}/") for line in stored)


def stage_dir(tmp_path: Path) -> Path:
    """A working folder the stage scripts run in: params.yaml for a small folder data set, data/raw fetched."""
    work = tmp_path / "work"
    shapes_folder(work / "images", per_class=30, size_range=(10, 30))
    raw = default_params()
    raw["data"].update(dataset="folder", path="images", image_size=16, channels=3)
    raw["preprocess"].update(val_size=10, test_size=10, shard_mb=0.005)  # 6 images a shard: 12 train shards
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run([sys.executable, str(REPO / "stages/fetch.py")], cwd=work)
    return work


@pytest.mark.slow  # runs the fetch and preprocess stage scripts
def test_killed_preprocess_leaves_no_partial_shard_under_an_outputs_name(tmp_path: Path) -> None:
    work = stage_dir(tmp_path)
    processed = work / "data/processed"
    run([sys.executable, str(REPO / "stages/preprocess.py")], cwd=work)
    before = snapshot(processed)
    assert len([name for name in before if name.startswith("train/images-")]) == 12

    # Another seed: other splits. SIGKILL half-way through filling the training split's third shard (shard 2).
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["preprocess"]["seed"] = 1
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    killed = subprocess.run(
        [sys.executable, str(HARNESS), "fill", "3", str(REPO / "stages/preprocess.py")],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = list(processed.glob(".train.*.tmp/images-00002.npy"))
    assert partial, "the kill landed mid-write, in a hidden folder beside the output"
    unfilled = np.load(partial[0], mmap_mode="r", allow_pickle=False)
    assert unfilled[0].any() and not unfilled[-1].any(), "its first images are decoded, its last not yet"
    assert snapshot(processed) == before, "every output is still the complete earlier one"
    for name in SPLITS:
        read_split(processed / name)

    run([sys.executable, str(REPO / "stages/preprocess.py")], cwd=work)
    assert not list(processed.glob(".*")), "the next run removes what the killed one left"
    assert not (work / "data/.processed.scratch").exists()
    after = snapshot(processed)
    assert after != before and {name.split("/")[0] for name in after} == {*SPLITS, "meta.json"}


@pytest.mark.slow  # five preprocess runs of a 2,000-image folder, about a minute
def test_preprocess_runs_again_and_again_without_hanging(tmp_path: Path) -> None:
    # The forked process pool of the last round hung about one run in ten (issue 25). Each run here is the stage
    # script itself, with every DeprecationWarning an error (Python warns when a process with threads forks).
    work = tmp_path / "work"
    shapes_folder(
        work / "images",
        per_class=500,
        classes=("circle", "square", "triangle", "star"),
        size_range=(40, 90),
        formats=("jpg", "png"),
    )
    raw = default_params()
    raw["data"].update(dataset="folder", path="images", image_size=32, channels=3)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run([sys.executable, str(REPO / "stages/fetch.py")], cwd=work)
    for attempt in range(REPEATS):
        try:
            run(
                [sys.executable, "-W", "error::DeprecationWarning", str(REPO / "stages/preprocess.py")],
                cwd=work,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"preprocess hung on run {attempt + 1} of {REPEATS}")
    assert sum(len(load_split(work / "data/processed" / name)) for name in SPLITS) == 2000


REPEATS = 5
