"""fetch_dataset against a real HTTP server on 127.0.0.1 serving tiny, self-made IDX files."""

import dataclasses
import gzip
import hashlib
import random
import socket
import struct
from pathlib import Path

import pytest

from image_classifier import fetch
from image_classifier.datasets import DATASETS, DatasetSpec, RemoteFile, get_dataset
from image_classifier.errors import UserError
from image_classifier.fetch import fetch_dataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def idx_images(count: int, seed: int, rows: int = 28, cols: int = 28) -> bytes:
    """An IDX3 file: magic 2051, count, rows, cols (big-endian int32), then uint8 pixels."""
    pixels = random.Random(seed).randbytes(count * rows * cols)
    return struct.pack(">iiii", 2051, count, rows, cols) + pixels


def idx_labels(count: int, seed: int) -> bytes:
    """An IDX1 file: magic 2049, count (big-endian int32), then uint8 labels."""
    rng = random.Random(seed)
    return struct.pack(">ii", 2049, count) + bytes(rng.randrange(10) for _ in range(count))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


TINY = {
    "train-images-idx3-ubyte": idx_images(20, seed=1),
    "train-labels-idx1-ubyte": idx_labels(20, seed=2),
    "t10k-images-idx3-ubyte": idx_images(10, seed=3),
    "t10k-labels-idx1-ubyte": idx_labels(10, seed=4),
}
ROLES = ("train_images", "train_labels", "test_images", "test_labels")
SPEC = DatasetSpec(
    name="tiny",
    format="idx",
    files={
        role: RemoteFile(name, sha256(data), len(data))
        for role, (name, data) in zip(ROLES, TINY.items(), strict=True)
    },
    mirrors=(),
    classes=tuple(str(digit) for digit in range(10)),
    image_shape=(1, 28, 28),
)


def publish(folder: Path, transform=lambda data: gzip.compress(data, mtime=0), suffix: str = ".gz") -> None:
    """Write every tiny file into `folder` as `<name><suffix>`, its bytes passed through `transform`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in TINY.items():
        (folder / f"{name}{suffix}").write_bytes(transform(data))


def flip_bytes(data: bytes) -> bytes:
    gz = bytearray(gzip.compress(data, mtime=0))
    for i in range(len(gz) // 2, len(gz) // 2 + 8):
        gz[i] ^= 0xFF
    return bytes(gz)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def dest(tmp_path):
    return tmp_path / "raw"


def assert_fetched(dest: Path, paths: list[Path]) -> None:
    assert paths == [dest / name for name in TINY]
    for name, data in TINY.items():
        assert sha256((dest / name).read_bytes()) == sha256(data)
    assert sorted(p.name for p in dest.iterdir()) == sorted(TINY), "temp files left behind"


def test_downloads_from_mirror(server, dest, capsys):
    publish(server.root / "good")
    paths = fetch_dataset(SPEC, dest, local_dirs=[], mirrors=[f"{server.url}/good/"])
    assert_fetched(dest, paths)
    assert sorted(server.requests) == sorted(f"/good/{name}.gz" for name in TINY)  # exactly one slash
    assert f"from {server.url}/good/train-images-idx3-ubyte.gz" in capsys.readouterr().out


def test_corrupt_first_mirror_falls_back_to_second(server, dest, capsys):
    publish(server.root / "bad", transform=flip_bytes)
    publish(server.root / "good")
    paths = fetch_dataset(SPEC, dest, local_dirs=[], mirrors=[f"{server.url}/bad", f"{server.url}/good"])
    assert_fetched(dest, paths)
    err = capsys.readouterr().err
    assert f"rejected {server.url}/bad/train-images-idx3-ubyte.gz" in err


@pytest.mark.parametrize(
    ("transform", "reason"),
    [
        (flip_bytes, ("gzip", "checksum")),
        (lambda data: gzip.compress(data[:-1] + bytes([data[-1] ^ 1])), ("checksum mismatch",)),
    ],
    ids=["flipped-bytes", "other-content"],
)
def test_only_corrupt_mirror_is_a_user_error(server, dest, transform, reason):
    publish(server.root / "bad", transform=transform)
    with pytest.raises(UserError) as raised:
        fetch_dataset(SPEC, dest, local_dirs=[], mirrors=[f"{server.url}/bad/"])
    message = str(raised.value)
    assert "\n" not in message
    assert "could not fetch train-images-idx3-ubyte" in message
    assert f"{server.url}/bad/train-images-idx3-ubyte.gz" in message
    assert any(word in message for word in reason), message
    assert not (dest / "train-images-idx3-ubyte").exists()
    assert list(dest.iterdir()) == []


def test_truncated_gzip_is_rejected(server, dest):
    publish(server.root / "cut", transform=lambda data: gzip.compress(data)[: len(gzip.compress(data)) // 2])
    with pytest.raises(UserError, match=r"cut/train-images-idx3-ubyte\.gz: truncated gzip"):
        fetch_dataset(SPEC, dest, local_dirs=[], mirrors=[f"{server.url}/cut/"])
    assert list(dest.iterdir()) == []


def test_every_failed_source_is_listed(server, dest, tmp_path):
    nowhere, unreachable, empty = tmp_path / "nowhere", closed_port_url(), f"{server.url}/empty/"
    with pytest.raises(UserError) as raised:
        fetch_dataset(SPEC, dest, local_dirs=[nowhere], mirrors=[unreachable, empty], timeout_s=5)
    message = str(raised.value)
    assert f"{nowhere}/train-images-idx3-ubyte.gz: No such file or directory" in message
    assert f"{unreachable}train-images-idx3-ubyte.gz: Connection refused" in message
    assert f"{empty}train-images-idx3-ubyte.gz: HTTP 404" in message
    assert "local folders" in message  # the hint


@pytest.mark.parametrize("suffix", [".gz", ""], ids=["gzipped", "plain"])
def test_local_dir_wins_without_touching_the_network(server, dest, tmp_path, suffix, capsys):
    local = tmp_path / "local"
    publish(local, transform=gzip.compress if suffix else bytes, suffix=suffix)
    publish(server.root / "good")
    paths = fetch_dataset(
        SPEC, dest, local_dirs=[tmp_path / "nowhere", local], mirrors=[f"{server.url}/good/"]
    )
    assert_fetched(dest, paths)
    assert server.requests == []
    assert f"from {local}/train-images-idx3-ubyte{suffix}" in capsys.readouterr().out


def test_second_call_does_no_work(server, dest, capsys):
    publish(server.root / "good")
    fetch_dataset(SPEC, dest, local_dirs=[], mirrors=[f"{server.url}/good/"])
    mtimes = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    requests_before = len(server.requests)
    capsys.readouterr()
    paths = fetch_dataset(SPEC, dest, local_dirs=[], mirrors=[f"{server.url}/good/"])
    assert_fetched(dest, paths)
    assert len(server.requests) == requests_before
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == mtimes
    assert capsys.readouterr().out == ""


def test_damaged_file_in_dest_is_replaced(server, dest):
    publish(server.root / "good")
    dest.mkdir()
    (dest / "train-labels-idx1-ubyte").write_bytes(b"not the labels")
    paths = fetch_dataset(SPEC, dest, local_dirs=[], mirrors=[f"{server.url}/good/"])
    assert_fetched(dest, paths)


def test_stale_temp_file_is_cleaned(server, dest):
    publish(server.root / "good")
    dest.mkdir()
    stale = dest / ".train-images-idx3-ubyte.k3j2h1.part"
    stale.write_bytes(b"half a download from a killed run")
    paths = fetch_dataset(SPEC, dest, local_dirs=[], mirrors=[f"{server.url}/good/"])
    assert not stale.exists()
    assert_fetched(dest, paths)


def test_interrupted_fetch_leaves_no_file(server, dest, monkeypatch):
    class InterruptingBar:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    publish(server.root / "good")
    monkeypatch.setattr(fetch, "tqdm", InterruptingBar)
    with pytest.raises(KeyboardInterrupt):
        fetch_dataset(SPEC, dest, local_dirs=[], mirrors=[f"{server.url}/good/"])
    assert list(dest.iterdir()) == []


def test_unknown_dataset_lists_known_ones():
    assert get_dataset("fashion-mnist") is DATASETS["fashion-mnist"]
    with pytest.raises(UserError, match=r"'nope'.*fashion-mnist"):
        get_dataset("nope")


def test_fashion_mnist_entry_matches_the_installed_files(dest):
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} not installed")
    full = get_dataset("fashion-mnist")
    assert set(full.files) == set(ROLES) and len(full.classes) == 10
    labels = {role: file for role, file in full.files.items() if role.endswith("_labels")}
    spec = dataclasses.replace(full, files=labels)
    paths = fetch_dataset(spec, dest, local_dirs=[FASHION_MNIST_DIR], mirrors=[closed_port_url()])
    for path, remote in zip(paths, labels.values(), strict=True):
        assert sha256(path.read_bytes()) == remote.sha256
        assert path.stat().st_size == remote.size
