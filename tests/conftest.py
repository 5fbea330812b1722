"""Shared fixtures: tiny IDX data sets the tests write themselves, a tiny config, and repository copies."""

import contextlib
import copy
import gzip
import hashlib
import http.server
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# No test may reach the Hugging Face Hub: huggingface_hub reads this once, when it is first imported.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import yaml

from image_classifier import params as params_module
from image_classifier.datasets import DatasetSpec, RemoteFile

REPO = Path(__file__).resolve().parent.parent
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = tuple(f"class{i}" for i in range(10))
# A model config small enough to train in a second on the tiny data sets below.
TINY_MODEL_CONFIG = {
    "dataset": "tiny",
    "model": "cnn",
    "width": 4,
    "image_shape": [1, 28, 28],
    "classes": list(CLASSES),
    "mean": [0.2],
    "std": [0.3],
    "test_time_flip": True,
}


def idx_bytes(array: torch.Tensor) -> bytes:
    """IDX encoding of a uint8 tensor: magic 0x0800 + number of dims, big-endian sizes, raw bytes."""
    header = (0x0800 + array.dim()).to_bytes(4, "big")
    header += b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + array.numpy().tobytes()


def learnable_images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """28x28 images whose class is visible (a bright bar at a class-specific row) under noise."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 60, (len(labels), 28, 28), generator=generator, dtype=torch.uint8)
    for index, label in enumerate(labels.tolist()):
        images[index, 2 + 2 * label : 4 + 2 * label, 4:24] = 230
    return images


def write_idx_dataset(
    folder: Path, train_size: int = 400, test_size: int = 100, gz: bool = True
) -> DatasetSpec:
    """Write a tiny, learnable Fashion-MNIST-shaped data set and return a spec with its checksums."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, size, seed in (("train", train_size, 1), ("test", test_size, 2)):
        labels = (torch.arange(size) % 10).to(torch.uint8)
        prefix = "train" if split == "train" else "t10k"
        for role, name, array in (
            ("images", f"{prefix}-images-idx3-ubyte", learnable_images(labels, seed)),
            ("labels", f"{prefix}-labels-idx1-ubyte", labels),
        ):
            data = idx_bytes(array)
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
            files[f"{split}_{role}"] = RemoteFile(name, hashlib.sha256(data).hexdigest(), len(data))
    return DatasetSpec("tiny", "idx", files, (), CLASSES, (1, 28, 28))


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar_images(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """3x32x32 images whose class is visible: a bright bar at a class-specific row, in a class-specific
    colour channel, under noise."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 60, (len(labels), 3, 32, 32), generator=generator, dtype=torch.uint8)
    for index, label in enumerate(labels.tolist()):
        images[index, label % 3, 2 + 3 * label : 4 + 3 * label, 4:28] = 230
    return images


def cifar_records(images: torch.Tensor, labels: torch.Tensor) -> bytes:
    """CIFAR-10 binary records: one label byte, then 1024 red, 1024 green, 1024 blue pixels, row-major."""
    flat = images.reshape(len(images), -1)
    return torch.cat([labels.to(torch.uint8)[:, None], flat], dim=1).numpy().tobytes()


def tar_member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    """A tar entry (header, contents) for tar_gz."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def tar_gz(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A gzipped tar of `entries` (from tar_member), byte-identical every time."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return gzip.compress(buffer.getvalue(), mtime=0)


def cifar_entries(
    train_size: int = 200, test_size: int = 50, classes: tuple[str, ...] = CIFAR_CLASSES
) -> tuple[list[tuple[tarfile.TarInfo, bytes]], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The members of a small archive laid out like cifar-10-binary.tar.gz (five training batches, a test
    batch, batches.meta.txt, readme.html), and the (images, labels) of each split they hold."""
    splits = {}
    for split, size, seed in (("train", train_size, 1), ("test", test_size, 2)):
        labels = torch.arange(size) % len(classes)
        splits[split] = (cifar_images(labels, seed), labels)
    top = "cifar-10-batches-bin"
    entries = [tar_member(top, kind=tarfile.DIRTYPE)]
    images, labels = splits["train"]
    per_batch = -(-train_size // 5)
    for batch in range(5):
        part = slice(batch * per_batch, (batch + 1) * per_batch)
        entries.append(
            tar_member(f"{top}/data_batch_{batch + 1}.bin", cifar_records(images[part], labels[part]))
        )
    entries.append(tar_member(f"{top}/test_batch.bin", cifar_records(*splits["test"])))
    entries.append(tar_member(f"{top}/batches.meta.txt", ("\n".join(classes) + "\n\n").encode()))
    entries.append(tar_member(f"{top}/readme.html", b"<html>a test archive</html>"))
    return entries, splits


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def cifar_spec(archive: bytes, name: str = "tiny-cifar", mirrors: tuple[str, ...] = ()) -> DatasetSpec:
    """A cifar-binary data set whose archive is pinned, like CIFAR-10's, by the md5 of `archive`."""
    remote = RemoteFile(f"{name}.tar.gz", "", len(archive), md5=md5(archive), gzipped=False)
    return DatasetSpec(name, "cifar-binary", {"archive": remote}, mirrors, CIFAR_CLASSES, (3, 32, 32))


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[SimpleNamespace]:
    """A real HTTP server on 127.0.0.1 serving `root`; `requests` lists the paths asked for."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_address[1]}", requests=requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SimpleNamespace]:
    root = tmp_path / "www"
    root.mkdir()
    with http_server(root) as served:
        yield served


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> tuple[DatasetSpec, Path]:
    folder = tmp_path / "tiny-idx"
    return write_idx_dataset(folder), folder


def default_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def tiny_params_dict(**overrides: dict[str, Any]) -> dict[str, Any]:
    """params.yaml with a seconds-long training run; `overrides` maps sections to changed keys."""
    raw = copy.deepcopy(default_params())
    raw["preprocess"].update(val_size=100)
    raw["train"].update(model="cnn", width=4, epochs=2, batch_size=64, device="cpu")
    for section, values in overrides.items():
        raw[section].update(values)
    return raw


@pytest.fixture
def tiny_params() -> params_module.Params:
    return params_module.from_dict(tiny_params_dict())


def copy_repo(dest: Path) -> Path:
    """A fresh git repository holding the project's tracked files (plus uncommitted edits), like a clone."""

    def git_files(*args: str) -> list[str]:
        return subprocess.run(
            ["git", "ls-files", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()

    # Tracked files, plus new files not yet committed, but never pipeline outputs lying in the workspace.
    outputs = ("data/", "models/", "reports/", "mlruns/", "tests/")
    untracked = [name for name in git_files("--others", "--exclude-standard") if not name.startswith(outputs)]
    for name in git_files("--cached") + untracked:
        source = REPO / name
        if source.is_file() and not name.startswith("tests/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dest, check=True)
    return dest


def write_params(repo: Path, raw: dict[str, Any]) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def run(args: list[str], cwd: Path, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command with the venv first on PATH, as `make` does; fail with its output if it fails."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.update(kwargs.pop("env", {}))
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


MLFLOW_URI_NAMES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def _mlflow_uri_restored() -> Iterator[None]:
    before = {name: os.environ.get(name) for name in MLFLOW_URI_NAMES}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _mlflow_uri_stays_in_its_test() -> Iterator[None]:
    """`mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into os.environ: without this, every command a
    later test starts would log to the store of the last test that connected in-process."""
    with _mlflow_uri_restored():
        yield


@pytest.fixture(scope="module", autouse=True)
def _mlflow_uri_stays_in_its_module() -> Iterator[None]:
    """The same for a module-scoped fixture that connects in-process (test_mlflow_pipeline's): autouse, so it is
    set up before the module's other fixtures and torn down after them."""
    with _mlflow_uri_restored():
        yield
