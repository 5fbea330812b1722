"""The data-set table and the formats beyond Fashion-MNIST: md5-pinned downloads, the CIFAR-10 binary archive
(download, verify, safe extraction, decoding) against a real HTTP server on 127.0.0.1, user declarations in
datasets.yaml, and the models on 3x32x32 colour images."""

import dataclasses
import gzip
import hashlib
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    CIFAR_CLASSES,
    FASHION_DIR,
    REPO,
    TINY_MODEL_CONFIG,
    cifar_entries,
    cifar_spec,
    copy_repo,
    http_server,
    idx_bytes,
    learnable_images,
    md5,
    tar_gz,
    tar_member,
    write_params,
)
from PIL import Image
from test_pipeline import STAGES, repro, subset_params

from image_classifier.augment import augment
from image_classifier.data import load_split
from image_classifier.datasets import (
    CIFAR_BATCH_RECORDS,
    CIFAR_MEMBERS,
    CIFAR_RECORD_BYTES,
    DATASETS,
    FORMAT_ROLES,
    RemoteFile,
    get_dataset,
    load_user_datasets,
)
from image_classifier.errors import UserError
from image_classifier.export import example_input, export_onnx, load_model, onnx_parity, save_model
from image_classifier.fetch import fetch_dataset, local_folders
from image_classifier.models import build_model
from image_classifier.predict import main as predict_main
from image_classifier.raw_formats import decode

TOP = "cifar-10-batches-bin"


def publish(server, archive: bytes, name: str = "tiny-cifar.tar.gz", folder: str = "mirror") -> str:
    (server.root / folder).mkdir(exist_ok=True)
    (server.root / folder / name).write_bytes(archive)
    return f"{server.url}/{folder}/"


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (dot-files too) with its bytes: what a failed run must leave unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- CIFAR-10 binary: the real path, on a generated archive ------------------------------------------------


def test_cifar_archive_is_downloaded_verified_extracted_and_decoded(server, tmp_path, capsys) -> None:
    entries, splits = cifar_entries()
    archive = tar_gz(entries)
    spec = cifar_spec(archive)
    dest = tmp_path / "raw"
    fetch_dataset(spec, dest, local_dirs=[tmp_path / "nowhere"], mirrors=[publish(server, archive)])
    assert server.requests == ["/mirror/tiny-cifar.tar.gz"]
    assert (
        dest / "tiny-cifar.tar.gz"
    ).read_bytes() == archive  # kept as served: its md5 can be checked again
    assert sorted(p.name for p in dest.iterdir()) == [TOP, "tiny-cifar.tar.gz"], "temp files left behind"
    assert sorted(p.name for p in (dest / TOP).iterdir()) == sorted(
        Path(info.name).name for info, _ in entries if info.isreg()
    )
    decoded = decode(dest, spec)
    for split, (images, labels) in splits.items():
        assert decoded[split].images.shape == (len(labels), 3, 32, 32)
        assert decoded[split].images.dtype == torch.uint8 and decoded[split].labels.dtype == torch.int64
        assert torch.equal(decoded[split].images, images), f"{split} pixels differ from what was written"
        assert torch.equal(decoded[split].labels, labels)
    # Channel order: class 1's bar is in the green channel only.
    first_one = int((splits["train"][1] == 1).nonzero()[0])
    assert decoded["train"].images[first_one, 1, 5:7, 4:28].eq(230).all()
    assert not decoded["train"].images[first_one, 0, 5:7, 4:28].eq(230).all()

    # A second run checks the stored archive's md5 and extracts it again, without the network.
    (dest / TOP / "test_batch.bin").write_bytes(b"damaged after the first run")
    fetch_dataset(spec, dest, local_dirs=[], mirrors=[publish(server, archive)])
    assert len(server.requests) == 1
    assert torch.equal(decode(dest, spec)["test"].images, splits["test"][0])
    assert "extracted 8 files" in capsys.readouterr().out


def test_cifar_archive_from_a_local_folder(server, tmp_path) -> None:
    archive = tar_gz(cifar_entries(train_size=50, test_size=10)[0])
    local = tmp_path / "datasets" / "tiny-cifar"
    local.mkdir(parents=True)
    (local / "tiny-cifar.tar.gz").write_bytes(archive)
    dirs = local_folders([str(tmp_path / "datasets" / "{dataset}")], "tiny-cifar")
    fetch_dataset(cifar_spec(archive), tmp_path / "raw", dirs, mirrors=[f"{server.url}/"])
    assert server.requests == []
    assert (tmp_path / "raw" / TOP / "test_batch.bin").stat().st_size == 10 * CIFAR_RECORD_BYTES


def with_member(*extra: tuple) -> list[tuple]:
    entries, _ = cifar_entries(train_size=50, test_size=10)
    return [*entries, *extra]


def without(name: str) -> list[tuple]:
    entries, _ = cifar_entries(train_size=50, test_size=10)
    return [entry for entry in entries if entry[0].name != f"{TOP}/{name}"]


BAD_ARCHIVES = {
    "dot-dot": (
        with_member(tar_member(f"{TOP}/../../evil.txt", b"x")),
        "points outside the extraction folder",
    ),
    "absolute": (with_member(tar_member("/tmp/evil.txt", b"x")), "'/tmp/evil.txt' points outside"),
    "symlink": (
        [
            *without("test_batch.bin"),
            tar_member(f"{TOP}/test_batch.bin", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        ],
        f"member '{TOP}/test_batch.bin' is a symlink",
    ),
    "hard-link": (
        [
            *without("test_batch.bin"),
            tar_member(f"{TOP}/test_batch.bin", kind=tarfile.LNKTYPE, link="/etc/passwd"),
        ],
        "is a hard link",
    ),
    "device": (
        [*without("readme.html"), tar_member(f"{TOP}/readme.html", kind=tarfile.CHRTYPE)],
        "is not a regular file",
    ),
    "extra-member": (with_member(tar_member(f"{TOP}/data_batch_6.bin", b"x")), "unexpected member"),
    "other-folder": (with_member(tar_member("elsewhere/data_batch_1.bin", b"x")), "unexpected member"),
    "oversized-member": (
        [
            *without("batches.meta.txt"),
            tar_member(f"{TOP}/batches.meta.txt", b"x" * (CIFAR_MEMBERS[f"{TOP}/batches.meta.txt"] + 1)),
        ],
        "more than the 4096 allowed",
    ),
    "duplicate-member": (with_member(tar_member(f"{TOP}/batches.meta.txt", b"a\n")), "appears twice"),
    "missing-member": (without("data_batch_3.bin"), f"member '{TOP}/data_batch_3.bin' is missing"),
}


@pytest.mark.parametrize("case", [*BAD_ARCHIVES, "truncated", "not-gzip"])
def test_unsafe_or_damaged_archive_is_refused_and_leaves_nothing(server, tmp_path, case) -> None:
    good = tar_gz(cifar_entries(train_size=50, test_size=10)[0])
    if case == "truncated":
        archive, message = good[: len(good) * 2 // 3], "damaged archive"
    elif case == "not-gzip":
        archive, message = b"this is not an archive" * 100, "damaged archive"
    else:
        entries, message = BAD_ARCHIVES[case]
        archive = tar_gz(entries)
    # Pinned to its own md5: a wrong pin or a compromised publisher is exactly when these checks matter.
    spec = cifar_spec(archive)
    dest = tmp_path / "raw"
    with pytest.raises(UserError) as raised:
        fetch_dataset(spec, dest, local_dirs=[], mirrors=[publish(server, archive)])
    text = str(raised.value)
    assert "\n" not in text
    assert text.startswith("could not fetch tiny-cifar.tar.gz: ")
    assert message in text, text
    assert list(dest.iterdir()) == [], "a refused archive must leave nothing, not even a temp file"
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_md5_mismatch_is_refused_and_earlier_good_outputs_stay(server, tmp_path) -> None:
    good = tar_gz(cifar_entries(train_size=50, test_size=10)[0])
    dest = tmp_path / "raw"
    fetch_dataset(cifar_spec(good), dest, local_dirs=[], mirrors=[publish(server, good, folder="good")])
    before = listing(dest)
    # The mirror now serves something else than the pinned archive.
    other = tar_gz(cifar_entries(train_size=40, test_size=10)[0])
    pinned = dataclasses.replace(
        cifar_spec(good),
        files={"archive": RemoteFile("tiny-cifar.tar.gz", "", len(good), md5="0" * 32, gzipped=False)},
    )
    with pytest.raises(
        UserError, match=r"checksum mismatch: got md5 [0-9a-f]{16}\.\.\. \(\d+ bytes\), expected 0000"
    ):
        fetch_dataset(pinned, dest, local_dirs=[], mirrors=[publish(server, other, folder="bad")])
    assert listing(dest) == before


def test_a_bad_new_archive_never_replaces_a_good_extraction(server, tmp_path) -> None:
    good = tar_gz(cifar_entries(train_size=50, test_size=10)[0])
    dest = tmp_path / "raw"
    fetch_dataset(cifar_spec(good), dest, local_dirs=[], mirrors=[publish(server, good, folder="good")])
    before = listing(dest)
    evil = tar_gz(with_member(tar_member(f"{TOP}/../evil", b"x")))
    with pytest.raises(UserError, match="points outside"):
        fetch_dataset(cifar_spec(evil), dest, local_dirs=[], mirrors=[publish(server, evil, folder="evil")])
    assert listing(dest) == before


def test_class_list_in_the_archive_must_match_the_declaration(server, tmp_path) -> None:
    renamed = (*CIFAR_CLASSES[:9], "lorry")
    archive = tar_gz(cifar_entries(train_size=50, test_size=10, classes=renamed)[0])
    dest = tmp_path / "raw"
    fetch_dataset(cifar_spec(archive), dest, local_dirs=[], mirrors=[publish(server, archive)])
    with pytest.raises(UserError, match=r"lists classes .*lorry; tiny-cifar declares .*truck"):
        decode(dest, cifar_spec(archive))


def test_cifar_batch_of_a_wrong_size_is_a_user_error(server, tmp_path) -> None:
    archive = tar_gz(cifar_entries(train_size=50, test_size=10)[0])
    dest = tmp_path / "raw"
    fetch_dataset(cifar_spec(archive), dest, local_dirs=[], mirrors=[publish(server, archive)])
    (dest / TOP / "data_batch_2.bin").write_bytes(b"\0" * 5000)
    with pytest.raises(UserError, match=r"data_batch_2.bin: not a CIFAR binary batch: 5000 bytes"):
        decode(dest, cifar_spec(archive))


# --- MNIST-style files pinned by the md5 of their .gz (KMNIST) -----------------------------------------------


def md5_pinned_idx(folder: Path) -> tuple[dict, dict[str, bytes]]:
    """Tiny IDX files gzipped into `folder`, and a spec pinning each by the md5 of its .gz, as KMNIST's is."""
    folder.mkdir(parents=True, exist_ok=True)
    files, plain = {}, {}
    for split, size, seed in (("train", 60, 1), ("test", 20, 2)):
        labels = (torch.arange(size) % 10).to(torch.uint8)
        prefix = "train" if split == "train" else "t10k"
        for role, name, array in (
            ("images", f"{prefix}-images-idx3-ubyte", learnable_images(labels, seed)),
            ("labels", f"{prefix}-labels-idx1-ubyte", labels),
        ):
            plain[name] = idx_bytes(array)
            served = gzip.compress(plain[name], mtime=0)
            (folder / f"{name}.gz").write_bytes(served)
            files[f"{split}_{role}"] = RemoteFile(name, "", len(plain[name]), md5=md5(served))
    return files, plain


def test_md5_pinned_gz_files_are_verified_and_decoded(server, tmp_path) -> None:
    files, plain = md5_pinned_idx(server.root / "kmnist")
    spec = dataclasses.replace(DATASETS["kmnist"], name="tiny-kmnist", files=files)
    # A decompressed local copy cannot be checked against the md5 of a .gz: it is passed over.
    local = tmp_path / "local"
    local.mkdir()
    for name, data in plain.items():
        (local / name).write_bytes(data)
    dest = tmp_path / "raw"
    fetch_dataset(spec, dest, local_dirs=[local], mirrors=[f"{server.url}/kmnist/"])
    assert sorted(server.requests) == sorted(f"/kmnist/{name}.gz" for name in plain)
    assert listing(dest) == plain  # stored decompressed, nothing else left
    decoded = decode(dest, spec)
    assert decoded["train"].images.shape == (60, 1, 28, 28)
    assert torch.equal(decoded["train"].images[:, 0], learnable_images(torch.arange(60) % 10, 1))
    # Such a file cannot be verified once stored, so a second run fetches it again.
    fetch_dataset(spec, dest, local_dirs=[], mirrors=[f"{server.url}/kmnist/"])
    assert len(server.requests) == 8


def test_md5_pinned_gz_with_other_bytes_is_refused(server, tmp_path) -> None:
    files, plain = md5_pinned_idx(server.root / "kmnist")
    name = "train-labels-idx1-ubyte"
    # Same content, gzipped differently (as Debian recompresses): the md5 of the .gz no longer matches.
    (server.root / "kmnist" / f"{name}.gz").write_bytes(gzip.compress(plain[name], compresslevel=1, mtime=1))
    spec = dataclasses.replace(DATASETS["kmnist"], name="tiny-kmnist", files=files)
    with pytest.raises(UserError, match=rf"could not fetch {name}: .*checksum mismatch: got md5"):
        fetch_dataset(spec, tmp_path / "raw", local_dirs=[], mirrors=[f"{server.url}/kmnist/"])
    assert not (tmp_path / "raw" / name).exists()


# --- The built-in table --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_built_in_entries_are_consistent(name: str) -> None:
    spec = DATASETS[name]
    assert spec.name == name and get_dataset(name) is spec
    assert set(spec.files) == set(FORMAT_ROLES[spec.format])
    assert len(spec.classes) == len(set(spec.classes)) == 10
    assert spec.mirrors and all(m.startswith("https://") and m.endswith("/") for m in spec.mirrors)
    for remote in spec.files.values():
        assert re.fullmatch(r"[0-9a-f]{64}", remote.sha256) or re.fullmatch(r"[0-9a-f]{32}", remote.md5)
    if spec.format == "idx":
        channels, height, width = spec.image_shape
        assert channels == 1
        for split, count in (("train", 60000), ("test", 10000)):
            # IDX: magic and count, plus rows and cols for images, as big-endian int32, then one byte each.
            assert spec.files[f"{split}_images"].size == 4 * 4 + count * height * width
            assert spec.files[f"{split}_labels"].size == 2 * 4 + count
            assert all(f.gzipped for f in spec.files.values())
    else:
        assert spec.image_shape == (3, 32, 32)
        assert not spec.files["archive"].gzipped  # stored as served: its md5 can be checked again


def test_cifar_member_bounds_follow_the_record_format() -> None:
    assert CIFAR_RECORD_BYTES == 1 + 3 * 32 * 32 == 3073
    batches = [name for name in CIFAR_MEMBERS if name.endswith(".bin")]
    assert len(batches) == 6
    # CIFAR-10: 50,000 training and 10,000 test images in six batches of at most 10,000.
    assert all(
        CIFAR_MEMBERS[name] == CIFAR_BATCH_RECORDS * CIFAR_RECORD_BYTES == 30730000 for name in batches
    )
    assert all(name.startswith(f"{TOP}/") for name in CIFAR_MEMBERS)


def test_unknown_dataset_lists_every_known_one(tmp_path) -> None:
    with pytest.raises(
        UserError, match=r"unknown data set 'svhn'; known data sets: cifar10, fashion-mnist, kmnist, mnist$"
    ):
        get_dataset("svhn", tmp_path / "none.yaml")


def test_local_dirs_template_names_the_data_set() -> None:
    assert local_folders(["/usr/share/datasets/{dataset}", "/data"], "mnist") == [
        Path("/usr/share/datasets/mnist"),
        Path("/data"),
    ]


# --- datasets.yaml --------------------------------------------------------------------------------------------


def declaration(**changes) -> dict:
    entry = {
        "format": "cifar-binary",
        "files": {"archive": {"name": "mine.tar.gz", "size": 1234, "md5": "a" * 32}},
        "mirrors": ["http://127.0.0.1:8000/data/"],
        "classes": list(CIFAR_CLASSES),
        "image_shape": [3, 32, 32],
    }
    entry.update(changes)
    return entry


def write_yaml(path: Path, raw) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_committed_datasets_yaml_declares_nothing_and_explains() -> None:
    text = (REPO / "datasets.yaml").read_text()
    assert load_user_datasets(REPO / "datasets.yaml") == {}
    assert "cifar-binary" in text and "sha256" in text


def test_user_dataset_is_found_by_name(tmp_path) -> None:
    idx_entry = {
        "format": "idx",
        "files": {
            role: {"name": f"{role}.idx", "size": 100, "sha256": hashlib.sha256(role.encode()).hexdigest()}
            for role in FORMAT_ROLES["idx"]
        },
        "mirrors": [],
        "classes": ["yes", "no"],
        "image_shape": [1, 16, 16],
    }
    path = write_yaml(tmp_path / "datasets.yaml", {"mine": declaration(), "my-digits": idx_entry})
    spec = get_dataset("mine", path)
    assert spec.format == "cifar-binary" and spec.image_shape == (3, 32, 32)
    assert spec.files["archive"] == RemoteFile("mine.tar.gz", "", 1234, md5="a" * 32, gzipped=False)
    assert spec.mirrors == ("http://127.0.0.1:8000/data/",)
    digits = get_dataset("my-digits", path)
    assert digits.classes == ("yes", "no") and all(f.gzipped for f in digits.files.values())
    with pytest.raises(
        UserError, match=r"known data sets: cifar10, fashion-mnist, kmnist, mine, mnist, my-digits"
    ):
        get_dataset("nope", path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"mnist": declaration()}, "data set 'mnist' is built in; give yours another name"),
        ({"folder": declaration()}, "data set 'folder' is built in"),
        ({"Mine!": declaration()}, "a data set name = 'Mine!' is not allowed"),
        (
            {"mine": declaration(format="png")},
            "mine.format = 'png' is not allowed; expected idx or cifar-binary",
        ),
        ({"mine": declaration(image_shape=[3, 28, 28])}, "mine.image_shape = [3, 28, 28] is not allowed"),
        ({"mine": declaration(classes=["a", "a"])}, "mine.classes = ['a', 'a'] is not allowed"),
        ({"mine": declaration(mirrors=["ftp://x/"])}, "mine.mirrors = ['ftp://x/'] is not allowed"),
        ({"mine": declaration(files={"archive": {"name": "a.tar.gz", "size": 10}})}, "a sha256 or an md5"),
        (
            {"mine": declaration(files={"archive": {"name": "../a.tar.gz", "size": 10, "md5": "a" * 32}})},
            "mine.files.archive.name = '../a.tar.gz' is not allowed; expected a plain file name",
        ),
        (
            {"mine": declaration(files={"archive": {"name": "a.tgz", "size": 10, "sha256": "xyz"}})},
            "mine.files.archive.sha256 = 'xyz' is not allowed; expected 64 lower-case hex digits",
        ),
        ({"mine": declaration(files={"train_images": {}})}, "mine.files = "),
        ({"mine": {**declaration(), "colour": True}}, "unknown key mine.colour"),
        ({"mine": {k: v for k, v in declaration().items() if k != "classes"}}, "missing key mine.classes"),
        (["mine"], "the top level = ['mine'] is not allowed"),
    ],
)
def test_bad_declarations_are_one_line_errors(tmp_path, raw, message: str) -> None:
    path = write_yaml(tmp_path / "datasets.yaml", raw)
    with pytest.raises(UserError) as raised:
        get_dataset("fashion-mnist", path)  # a broken file stops every data set, as params.yaml does
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value), str(raised.value)


def test_yaml_syntax_error_names_the_line(tmp_path) -> None:
    path = tmp_path / "datasets.yaml"
    path.write_text("mine:\n  format: [idx\n")
    with pytest.raises(UserError, match=r"datasets.yaml: YAML syntax error at line 3"):
        get_dataset("mnist", path)


# --- Models on 3x32x32 colour images -------------------------------------------------------------------------

RGB_CONFIG = {
    **TINY_MODEL_CONFIG,
    "dataset": "tiny-cifar",
    "image_shape": [3, 32, 32],
    "classes": list(CIFAR_CLASSES),
    "mean": [0.2, 0.4, 0.6],
    "std": [0.1, 0.2, 0.3],
    "test_time_flip": False,  # these tests compare against the bare network
}


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_models_take_colour_images_and_normalise_per_channel(model: str) -> None:
    config = {**RGB_CONFIG, "model": model}
    classifier = build_model(config).eval()
    images = torch.rand(5, 3, 32, 32)
    assert classifier(images).shape == (5, 10)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    assert torch.allclose(classifier(images), classifier.network((images - mean) / std))


def test_augmentation_moves_every_channel_of_an_image_alike() -> None:
    generator = torch.Generator().manual_seed(0)
    grey = torch.randint(1, 255, (64, 1, 32, 32), dtype=torch.uint8, generator=generator)
    images = grey.expand(64, 3, 32, 32).contiguous()
    out = augment(images, crop_padding=4, flip=True, generator=torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert (out == 0).any(), "some images were shifted (zero fill)"
    assert not torch.equal(out, images)


def test_onnx_export_and_predict_on_colour_images(tmp_path, capsys) -> None:
    model = build_model(RGB_CONFIG).eval()
    save_model(tmp_path / "model.pt", RGB_CONFIG, model.state_dict())
    loaded, config = load_model(tmp_path / "model.pt")
    export_onnx(loaded, example_input(config), tmp_path / "model.onnx", opset=18)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    parity = onnx_parity(tmp_path / "model.onnx", loaded, images, batch_size=4)
    assert parity["onnx_max_abs_logit_diff"] < 1e-4 and parity["onnx_prediction_agreement"] == 1.0
    photo = torch.zeros(40, 50, 3, dtype=torch.uint8)
    photo[..., 1] = 200
    Image.fromarray(photo.numpy()).save(tmp_path / "green.png")
    predict_main([str(tmp_path / "green.png"), "--model", str(tmp_path / "model.pt")])
    assert re.fullmatch(r'.*green.png: Predicted: "[a-z]+" \(\d+\.\d%\)\n', capsys.readouterr().out)


# --- The whole pipeline on a declared CIFAR-format data set, and switching data sets (slow) ------------------


def model_hash(repo: Path) -> str:
    return hashlib.sha256((repo / "models/model.pt").read_bytes()).hexdigest()


def cifar_params() -> dict:
    raw = subset_params()
    raw["data"]["dataset"] = "tiny-cifar"
    raw["preprocess"].update(val_size=40, train_subset=0)
    return raw


@pytest.fixture(scope="module")
def switched(tmp_path_factory: pytest.TempPathFactory):
    """A repository copy that ran the pipeline on a Fashion-MNIST subset, then on a generated CIFAR-format
    archive declared in datasets.yaml and served on 127.0.0.1, then on the subset again; what each run did."""
    if not FASHION_DIR.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist (make setup)")
    www = tmp_path_factory.mktemp("www")
    entries, splits = cifar_entries()
    archive = tar_gz(entries)
    (www / "tiny-cifar.tar.gz").write_bytes(archive)
    repo = copy_repo(tmp_path_factory.mktemp("switch"))
    with http_server(www) as server:
        entry = declaration(
            files={"archive": {"name": "tiny-cifar.tar.gz", "size": len(archive), "md5": md5(archive)}},
            mirrors=[f"{server.url}/"],
        )
        # Declared before the first run: datasets.yaml is a dependency, so it must not change between runs.
        write_yaml(repo / "datasets.yaml", {"tiny-cifar": entry})
        runs = {}
        write_params(repo, subset_params())
        runs["fashion"] = (repro(repo), model_hash(repo))
        write_params(repo, cifar_params())
        runs["cifar"] = (repro(repo), model_hash(repo))
        requests = list(server.requests)
        cifar_outputs = {
            name: (repo / name).read_bytes()
            for name in (
                "data/processed/meta.json",
                "reports/evaluate/metrics.json",
                "reports/export/metrics.json",
            )
        }
        cifar_outputs["test images"] = load_split(repo / "data/processed/test").images[:]
        write_params(repo, subset_params())
        runs["back"] = (repro(repo), model_hash(repo))
    return repo, runs, requests, cifar_outputs, splits


@pytest.mark.slow
def test_pipeline_runs_on_a_declared_cifar_format_data_set(switched) -> None:
    _, runs, requests, outputs, splits = switched
    assert runs["cifar"][0] == dict.fromkeys(STAGES, "ran")
    assert requests == ["/tiny-cifar.tar.gz"]  # /usr/share/datasets/tiny-cifar does not exist: the mirror
    meta = json.loads(outputs["data/processed/meta.json"])
    assert meta["dataset"] == "tiny-cifar" and meta["image_shape"] == [3, 32, 32]
    assert meta["classes"] == list(CIFAR_CLASSES)
    assert meta["sizes"] == {"train": 160, "val": 40, "test": 50}
    assert len(meta["mean"]) == len(meta["std"]) == 3
    assert torch.equal(
        outputs["test images"], splits["test"][0]
    )  # pixel-exact through fetch, extract and preprocess
    evaluation = json.loads(outputs["reports/evaluate/metrics.json"])
    assert 0 <= evaluation["accuracy"] <= 1 and set(evaluation["per_class"]) == set(CIFAR_CLASSES)
    export = json.loads(outputs["reports/export/metrics.json"])
    assert export["onnx_checked_images"] == 50 and export["onnx_prediction_agreement"] == 1.0
    assert export["onnx_max_abs_logit_diff"] <= 1e-4


@pytest.mark.slow
def test_switching_data_sets_reruns_from_fetch_and_switching_back_restores_from_cache(switched) -> None:
    repo, runs, *_ = switched
    assert runs["fashion"][0] == dict.fromkeys(STAGES, "ran")
    assert runs["cifar"][0]["fetch"] == "ran"
    outcome, model = runs["back"]
    assert "ran" not in outcome.values(), outcome
    assert outcome["train"] == "cached"
    assert model == runs["fashion"][1] != runs["cifar"][1]
    meta = json.loads((repo / "data/processed/meta.json").read_text())
    assert meta["dataset"] == "fashion-mnist" and meta["image_shape"] == [1, 28, 28]
    assert (repo / "data/raw/train-images-idx3-ubyte").is_file()
    assert not (repo / "data/raw/tiny-cifar.tar.gz").exists()
