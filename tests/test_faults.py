"""The fault suite, bad input (issue 6): every case runs the real command (a stage script or `predict`) as a
subprocess in a copy of a repository that already holds good outputs, and checks the CLI contract: exit status 2,
exactly one line on stderr that names the cause, and every earlier output byte-identical with nothing added.

The prepared repository has tiny, learnable Fashion-MNIST-shaped data in data/raw (what fetch leaves there),
processed splits, a trained model and its reports, all made by the real stages.
"""

import gzip
import os
import re
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_repo, run, tiny_params_dict, write_idx_dataset, write_params
from fault_helpers import assert_refused, closed_port, register_case_count
from PIL import Image

pytestmark = pytest.mark.slow

FETCH = ["python", "stages/fetch.py"]
PREPROCESS = ["python", "stages/preprocess.py"]
TRAIN = ["python", "stages/train.py"]
PORT = closed_port()
MIRROR = f"http://127.0.0.1:{PORT}/"
IMAGES = "train-images-idx3-ubyte"
LABELS = "train-labels-idx1-ubyte"


@pytest.fixture(scope="module", autouse=True)
def _count_cases(request: pytest.FixtureRequest) -> None:
    register_case_count(request.config)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("faults"))
    write_idx_dataset(repo / "data/raw", gz=False)  # 400 training and 100 test images, as fetch leaves them
    write_params(repo, tiny_params_dict(fetch={"local_dirs": [], "mirrors": [MIRROR], "timeout_s": 5}))
    run(PREPROCESS, cwd=repo)
    run(TRAIN, cwd=repo)
    assert (repo / "models/model.pt").is_file() and (repo / "reports/train/metrics.json").is_file()
    return repo


@pytest.fixture
def repo(prepared: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared repository: a case may break anything in it."""
    return Path(shutil.copytree(prepared, tmp_path / "repo", symlinks=True))


# --- Ways to break a repository ----------------------------------------------------------------------------

Setup = Callable[[Path], None]


def timm_weights_for_another_architecture(repo: Path) -> None:
    """A ViT's weights named as the pretrained weights of a ResNet."""
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("test_vit").state_dict(), str(repo / "vit.safetensors"))
    set_params(train={"model": "timm:test_resnet", "pretrained": "vit.safetensors"})(repo)


def set_params(**sections: dict) -> Setup:
    """Change keys of params.yaml: set_params(train={"lr": 0})."""

    def setup(repo: Path) -> None:
        raw = yaml.safe_load((repo / "params.yaml").read_text())
        for section, values in sections.items():
            raw[section].update(values)
        write_params(repo, raw)

    return setup


def drop_params(section: str, key: str | None = None) -> Setup:
    def setup(repo: Path) -> None:
        raw = yaml.safe_load((repo / "params.yaml").read_text())
        if key is None:
            del raw[section]
        else:
            del raw[section][key]
        write_params(repo, raw)

    return setup


def edit_params(pattern: str, new: str) -> Setup:
    """Replace the first match of a regular expression in params.yaml's text."""

    def setup(repo: Path) -> None:
        text, count = re.subn(pattern, new, (repo / "params.yaml").read_text(), count=1)
        assert count == 1, pattern
        (repo / "params.yaml").write_text(text)

    return setup


def rename_section(old: str, new: str) -> Setup:
    def setup(repo: Path) -> None:
        raw = yaml.safe_load((repo / "params.yaml").read_text())
        write_params(repo, {new if name == old else name: value for name, value in raw.items()})

    return setup


def replace_section(section: str, value: object) -> Setup:
    def setup(repo: Path) -> None:
        raw = yaml.safe_load((repo / "params.yaml").read_text())
        write_params(repo, {**raw, section: value})

    return setup


def local_source(make: Callable[[bytes], bytes]) -> Setup:
    """Offer `faults/<train images>.gz`, made from the real bytes of the tiny file, as the only local copy."""

    def setup(repo: Path) -> None:
        folder = repo / "faults"
        folder.mkdir()
        (folder / f"{IMAGES}.gz").write_bytes(make((repo / "data/raw" / IMAGES).read_bytes()))
        set_params(fetch={"local_dirs": [str(folder)]})(repo)

    return setup


def change_file(name: str, make: Callable[[bytes], bytes] | None) -> Setup:
    """Replace a file's bytes with make(old bytes), or delete it when `make` is None."""

    def setup(repo: Path) -> None:
        path = repo / name
        if make is None:
            path.unlink()
        else:
            path.write_bytes(make(path.read_bytes()))

    return setup


def idx_labels(labels: bytes) -> bytes:
    return struct.pack(">ii", 2049, len(labels)) + labels


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header declaring width×height grey pixels, with one tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
        + chunk(b"IEND", b"")
    )


def noise_png(repo: Path) -> bytes:
    path = repo / "noise.png"
    Image.frombytes(
        "L", (64, 64), torch.randint(0, 256, (64 * 64,), dtype=torch.uint8).numpy().tobytes()
    ).save(path)
    return path.read_bytes()


def write_file(name: str, make: Callable[[Path], bytes]) -> Setup:
    """Write make(repository) to a new file outside the outputs."""

    def setup(repo: Path) -> None:
        (repo / name).write_bytes(make(repo))

    return setup


class Exploit:
    """A pickle that runs a shell command when unpickled by a loader that allows arbitrary globals."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def pickled_code_model(repo: Path) -> None:
    saved = torch.load(repo / "models/model.pt", weights_only=True)
    torch.save({**saved, "config": Exploit()}, repo / "evil-model.pt")


@dataclass(frozen=True)
class Case:
    command: list[str]
    setup: Setup
    expect: tuple[str, ...]
    inputs: tuple[str, ...] = ()  # files the setup damages on purpose: not compared afterwards
    env: dict[str, str] = field(default_factory=dict)


def nothing(repo: Path) -> None:
    pass


# --- The cases ---------------------------------------------------------------------------------------------

PARAMS_CASES = {
    "yaml-syntax-error": Case(
        FETCH,
        edit_params(r"(?m)^  epochs: 2$", "  epochs: 2: 3"),
        (r"params.yaml: YAML syntax error at line (\d+), column 12: mapping values are not allowed here",),
    ),
    "unknown-section": Case(
        FETCH, rename_section("train", "trian"), (r"unknown key 'trian'; did you mean 'train'\?",)
    ),
    "unknown-nested-key": Case(
        FETCH,
        set_params(train={"epoch": 3}),
        (r"unknown key 'train.epoch'; did you mean 'train.epochs'\?",),
    ),
    "unknown-key-no-match": Case(
        FETCH,
        set_params(evaluate={"colour": "red"}),
        (r"unknown key 'evaluate.colour'; known keys: batch_size",),
    ),
    "wrong-type-text-for-int": Case(
        FETCH,
        set_params(train={"epochs": "ten"}),
        (r"train.epochs = 'ten' must be an integer >= 1 or 'auto', not str",),
    ),
    "wrong-type-float-for-int": Case(
        FETCH,
        set_params(train={"batch_size": 64.5}),
        (r"train.batch_size = 64.5 must be an integer >= 1 or 'auto', not float",),
    ),
    "wrong-type-text-for-bool": Case(
        FETCH, set_params(train={"flip": "maybe"}), (r"train.flip = 'maybe' must be bool, not str",)
    ),
    "wrong-type-exponent-read-as-text": Case(
        FETCH,
        edit_params(r"(?m)^  lr: .*$", "  lr: 1e-3"),
        (r"train.lr = '1e-3' must be a number in \(0, 10\] or 'auto', not str; write it as 0.001",),
    ),
    "section-not-a-mapping": Case(
        FETCH, replace_section("train", 5), (r"train must be a mapping of keys to values",)
    ),
    "lr-zero": Case(
        FETCH, set_params(train={"lr": 0}), (r"train.lr = 0 is out of range; allowed: .*\(0, 10\]",)
    ),
    "lr-negative": Case(FETCH, set_params(train={"lr": -0.1}), (r"train.lr = -0.1 is out of range",)),
    "epochs-zero": Case(
        FETCH,
        set_params(train={"epochs": 0}),
        (r"train.epochs = 0 is out of range; allowed: an integer >= 1",),
    ),
    "batch-size-zero": Case(
        FETCH, set_params(train={"batch_size": 0}), (r"train.batch_size = 0 is out of range",)
    ),
    "unknown-model": Case(
        FETCH,
        set_params(train={"model": "resnet"}),
        (r"train.model = 'resnet' is out of range; .*did you mean 'timm:resnet'\?",),
    ),
    "unknown-optimizer": Case(
        FETCH,
        set_params(train={"optimizer": "adam"}),
        (r"train.optimizer = 'adam' .*did you mean 'adamw'\?",),
    ),
    "unknown-schedule": Case(
        FETCH,
        set_params(train={"schedule": "step"}),
        (r"train.schedule = 'step' is not allowed; use one of none, onecycle, cosine",),
    ),
    "missing-section": Case(FETCH, drop_params("preprocess"), (r"missing section 'preprocess'",)),
    "missing-key": Case(FETCH, drop_params("train", "lr"), (r"missing key 'train.lr'",)),
    "missing-params-file": Case(
        FETCH, change_file("params.yaml", None), (r"cannot read params.yaml: No such file or directory",)
    ),
    "unknown-dataset": Case(
        FETCH,
        set_params(data={"dataset": "svhn"}),
        (r"unknown data set 'svhn'; known data sets: cifar10, fashion-mnist, kmnist, mnist",),
    ),
    "datasets-yaml-syntax-error": Case(
        PREPROCESS,
        change_file("datasets.yaml", lambda data: b"mine:\n  format: [idx\n"),
        (r"datasets.yaml: YAML syntax error at line 3",),
        inputs=("datasets.yaml",),
    ),
    "datasets-yaml-shadows-built-in": Case(
        FETCH,
        change_file("datasets.yaml", lambda data: b"mnist: {format: idx}\n"),
        (r"datasets.yaml: data set 'mnist' is built in; give yours another name",),
        inputs=("datasets.yaml",),
    ),
    "val-size-leaves-no-training-data": Case(
        PREPROCESS,
        set_params(preprocess={"val_size": 400}),
        (r"preprocess.val_size = 400 leaves no training images \(training set has 400\)",),
    ),
    "subset-larger-than-data": Case(
        PREPROCESS,
        set_params(preprocess={"train_subset": 301}),
        (r"preprocess.train_subset = 301 is more than the 300 training images",),
    ),
    "unknown-timm-architecture": Case(
        PREPROCESS,
        set_params(train={"model": "timm:resnet19"}),
        (r"train.model = 'timm:resnet19': timm has no architecture 'resnet19'; closest: resnet18",),
    ),
    "pretrained-weights-of-another-architecture": Case(
        TRAIN,
        timm_weights_for_another_architecture,
        (r"train.pretrained: .*vit.safetensors does not fit timm:test_resnet: missing conv1.0.weight",),
    ),
    "tracking-store-unreachable": Case(
        TRAIN,
        nothing,
        (rf"http://127.0.0.1:{PORT}", r"(?i)refused"),
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{PORT}"},
    ),
}

DATA_CASES = {
    # fetch: the only local copy is bad and the only mirror refuses connections; data/raw stays as it was.
    "truncated-gz": Case(
        FETCH,
        local_source(lambda data: gzip.compress(data)[:-200]),
        (
            rf"could not fetch {IMAGES}: .*faults/{IMAGES}.gz: truncated gzip",
            rf"{MIRROR}{IMAGES}.gz: .*refused",
        ),
    ),
    "checksum-mismatch": Case(
        FETCH,
        local_source(gzip.compress),
        (
            rf"faults/{IMAGES}.gz: checksum mismatch: got sha256 [0-9a-f]{{16}}\.\.\. \(\d+ bytes\), expected c59f468a2f672dc8",
        ),
    ),
    "corrupt-gz": Case(FETCH, local_source(lambda data: b"not gzip at all" * 10), (r"corrupt gzip",)),
    "empty-gz": Case(FETCH, local_source(lambda data: b""), (rf"faults/{IMAGES}.gz: empty file",)),
    "no-source-reachable": Case(
        FETCH,
        set_params(fetch={"local_dirs": ["/nonexistent/fashion-mnist"]}),
        (
            rf"could not fetch {IMAGES}: /nonexistent/fashion-mnist/{IMAGES}.gz: No such file or directory; "
            rf"{MIRROR}{IMAGES}.gz: .*refused",
        ),
    ),
    # preprocess: damaged raw files; data/processed and the preview stay as they were.
    "wrong-idx-magic": Case(
        PREPROCESS,
        change_file(f"data/raw/{IMAGES}", lambda data: (2049).to_bytes(4, "big") + data[4:]),
        (rf"{IMAGES}: IDX magic number 2049 is wrong; expected 2051 for images",),
        inputs=(f"data/raw/{IMAGES}",),
    ),
    "image-label-count-mismatch": Case(
        PREPROCESS,
        change_file(f"data/raw/{LABELS}", lambda data: idx_labels(data[8:-1])),
        (r"train split: 400 images but 399 labels",),
        inputs=(f"data/raw/{LABELS}",),
    ),
    "label-out-of-range": Case(
        PREPROCESS,
        change_file(f"data/raw/{LABELS}", lambda data: idx_labels(data[8:-1] + b"\x0a")),
        (r"train split: label 10 is out of range; fashion-mnist has classes 0..9",),
        inputs=(f"data/raw/{LABELS}",),
    ),
    "empty-raw-file": Case(
        PREPROCESS,
        change_file("data/raw/t10k-labels-idx1-ubyte", lambda data: b""),
        (r"t10k-labels-idx1-ubyte is empty or truncated \(0 bytes\)",),
        inputs=("data/raw/t10k-labels-idx1-ubyte",),
    ),
    "truncated-raw-file": Case(
        PREPROCESS,
        change_file(f"data/raw/{IMAGES}", lambda data: data[: len(data) // 2]),
        (rf"{IMAGES}: not a valid IDX images file",),
        inputs=(f"data/raw/{IMAGES}",),
    ),
    "missing-raw-file": Case(
        PREPROCESS,
        change_file(f"data/raw/{LABELS}", None),
        (rf"{LABELS} is missing; run the fetch stage first",),
        inputs=(f"data/raw/{LABELS}",),
    ),
    # train and predict: missing or damaged processed data.
    "missing-processed-meta": Case(
        TRAIN,
        change_file("data/processed/meta.json", None),
        (r"data/processed/meta.json is missing; run the preprocess stage first",),
        inputs=("data/processed/meta.json",),
    ),
    "damaged-processed-split": Case(
        ["predict", "--index", "0"],
        change_file("data/processed/test/images-00000.npy", lambda data: data[:1000]),
        (
            r"data/processed/test cannot be loaded: mmap length is greater than file size; restore it with 'dvc checkout preprocess'",
        ),
        inputs=("data/processed/test/images-00000.npy",),
    ),
}

PREDICT_CASES = {
    "nonexistent-image": Case(["predict", "missing.png"], nothing, (r"missing.png: no such file",)),
    # A folder is searched for images (issue 26): one without any is a mistake, and no --out file appears.
    "empty-folder": Case(
        ["predict", "folder", "--out", "reports/predictions.csv"],
        lambda repo: (repo / "folder").mkdir(),
        (r"folder: no image files in this folder",),
    ),
    "pattern-matching-nothing": Case(
        ["predict", "scans/*.png", "--out", "reports/predictions.csv"],
        nothing,
        (r"no files match this pattern",),
    ),
    "unknown-registered-model": Case(
        ["predict", "--index", "0", "--model", "models:/nope@champion", "--out", "reports/predictions.csv"],
        nothing,
        (r"models:/nope@champion: no registered model 'nope' in sqlite:///",),
    ),
    "nonexistent-onnx-model": Case(
        ["predict", "--index", "0", "--model", "models/export/nowhere.onnx"],
        nothing,
        (r"model file models/export/nowhere.onnx does not exist",),
    ),
    "unwritable-output": Case(
        ["predict", "--index", "0", "--out", "params.yaml/predictions.csv"],
        nothing,
        (r"--out params.yaml/predictions.csv: cannot write there",),
    ),
    "output-of-unknown-format": Case(
        ["predict", "--index", "0", "--out", "reports/predictions.xlsx"],
        nothing,
        (r"write predictions to a .csv or .jsonl file",),
    ),
    "every-file-unreadable": Case(
        ["predict", "notes.png", "notes.jpg", "--out", "reports/predictions.csv"],
        lambda repo: [(repo / name).write_bytes(b"shopping list\n") for name in ("notes.png", "notes.jpg")],
        (r"none of the 2 images could be read; the first: notes.png: not an image file",),
    ),
    "not-an-image": Case(
        ["predict", "notes.png"],
        write_file("notes.png", lambda repo: b"shopping list\n"),
        (r"notes.png: not an image file PIL can read",),
    ),
    "truncated-png": Case(
        ["predict", "cut.png"],
        write_file("cut.png", lambda repo: noise_png(repo)[:-1500]),
        (r"cut.png: image data is corrupt or truncated",),
    ),
    "decompression-bomb": Case(
        ["predict", "bomb.png"],
        write_file("bomb.png", lambda repo: png_header_only(8000, 6000)),
        (r"bomb.png: image is too large \(over 40,000,000 pixels\); refusing to decode it",),
    ),
    "decompression-bomb-past-pil-limit": Case(
        ["predict", "huge.png"],
        write_file("huge.png", lambda repo: png_header_only(30000, 30000)),
        (r"huge.png: image is too large",),
    ),
    "unreadable-model-file": Case(
        ["predict", "--index", "0", "--model", "junk.pt"],
        write_file("junk.pt", lambda repo: b"\x00garbage" * 100),
        (r"cannot load model file junk.pt: not a file torch.save wrote",),
    ),
    "truncated-model-file": Case(
        ["predict", "--index", "0", "--model", "cut.pt"],
        write_file("cut.pt", lambda repo: (repo / "models/model.pt").read_bytes()[:2000]),
        (r"cannot load model file cut.pt: truncated or damaged",),
    ),
    "model-file-with-pickled-code": Case(
        ["predict", "--index", "0", "--model", "evil-model.pt"],
        pickled_code_model,
        (r"cannot load model file evil-model.pt: it holds Python code .*\((posix|os)\.system\); refusing",),
    ),
    "nonexistent-model-file": Case(
        ["predict", "--index", "0", "--model", "nowhere.pt"],
        nothing,
        (r"model file nowhere.pt does not exist; run the pipeline first",),
    ),
    "test-index-out-of-range": Case(
        ["predict", "--index", "100"], nothing, (r"--index 100 is out of range; the test set has 100 images",)
    ),
}


def check_case(repo: Path, case: Case) -> str:
    case.setup(repo)
    return assert_refused(repo, case.command, case.expect, env=case.env, inputs=case.inputs)


@pytest.mark.parametrize("case", PARAMS_CASES.values(), ids=PARAMS_CASES.keys())
def test_bad_params(repo: Path, case: Case) -> None:
    line = check_case(repo, case)
    if case is PARAMS_CASES["yaml-syntax-error"]:  # the line number points at the edited line
        lines = (repo / "params.yaml").read_text().splitlines()
        assert lines[int(re.search(r"line (\d+)", line)[1]) - 1] == "  epochs: 2: 3"


def test_accelerator_that_is_not_there(repo: Path) -> None:
    """`device: cuda` where there is no CUDA (or, on a CUDA machine, another accelerator that is absent)."""
    absent = next(name for name in ("cuda", "xpu", "mps") if not getattr(torch, name).is_available())
    check_case(
        repo,
        Case(
            TRAIN,
            set_params(train={"device": absent}),
            (
                rf"train.device = '{absent}' but no {absent.upper()} device is available here; "
                "use 'auto' or 'cpu'",
            ),
        ),
    )


@pytest.mark.parametrize("case", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_bad_data(repo: Path, case: Case) -> None:
    check_case(repo, case)
    assert not list((repo / "data/raw").glob(".*")), "no temporary file left in data/raw"


@pytest.mark.parametrize("case", PREDICT_CASES.values(), ids=PREDICT_CASES.keys())
def test_bad_predict_input(repo: Path, case: Case) -> None:
    check_case(repo, case)
    assert not (repo / "pwned").exists(), "a pickled command ran"


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(repo: Path) -> None:
    # An SGD recipe that blows up once one-cycle's warm-up (epoch 1 of 4) reaches lr 10: epoch 1 ends finite and
    # is checkpointed, a later epoch produces an infinite or NaN loss.
    recipe = {
        "model": "mlp",
        "optimizer": "sgd",
        "lr": 10.0,
        "momentum": 0.99,
        "nesterov": True,
        "weight_decay": 0.0,
        "schedule": "onecycle",
        "label_smoothing": 0.0,
        "epochs": 4,
        "batch_size": 64,
        "precision": "fp32",
    }
    set_params(train=recipe)(repo)
    line = assert_refused(
        repo,
        TRAIN,
        (r"loss became non-finite at epoch ([2-4]), step \d+; training stopped, the last good checkpoint",),
    )
    epoch = int(re.search(r"at epoch (\d+)", line)[1])
    assert f"(epoch {epoch - 1}) is kept at" in line
    kept = repo / re.search(r"kept at (\S+);", line)[1]
    assert torch.load(kept, weights_only=True)["epoch"] == epoch - 1
