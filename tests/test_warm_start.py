"""Warm start (train.init_from): fine-tuning beats a cold start, shape mismatches are skipped and reported, the
file is read memory-mapped into a meta-device model, models:/ URIs resolve through the registry, bad files are
refused in one line, and the train stage prints and logs what it loaded."""

import hashlib
import pickle
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import TINY_MODEL_CONFIG, copy_repo, idx_bytes, run, tiny_params_dict, write_params
from mlflow import MlflowClient
from test_train import make_split, state_hash

from image_classifier import params as params_module
from image_classifier import tracking, warm_start
from image_classifier.data import Split
from image_classifier.errors import UserError
from image_classifier.export import example_input, save_model
from image_classifier.models import CNN_LAYOUT, build_model
from image_classifier.params import TrackingParams
from image_classifier.train import train
from image_classifier.train_state import resume_path
from image_classifier.warm_start import load_initial_weights, resolve

CONFIG = TINY_MODEL_CONFIG
STAGE_CONFIG = {**CONFIG, "model_kwargs": CNN_LAYOUT}  # what the train stage builds for a cnn
# The "MNIST" target: same image size, its own statistics (mean/std must come from here, not from the file).
TARGET_CONFIG = {**CONFIG, "dataset": "tiny-target", "mean": [0.31], "std": [0.27]}
CPU = torch.device("cpu")
STEM = "network.features.0.weight"
FRESH = ("mean", "std", "temperature")  # always a cold start's: see warm_start.FRESH_KEYS


def target_split(size: int, seed: int) -> Split:
    """A second learnable set, unlike conftest's: more noise, shuffled labels, a dimmer, narrower bar one row
    lower. Related (as MNIST is to Fashion-MNIST: small grayscale strokes), not the same images."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randperm(size, generator=generator) % 10
    images = torch.randint(0, 90, (size, 28, 28), generator=generator, dtype=torch.uint8)
    for index, label in enumerate(labels.tolist()):
        images[index, 3 + 2 * label : 5 + 2 * label, 8:20] = 200
    return Split(images.unsqueeze(1), labels)


@pytest.fixture(scope="module")
def tiny_train_params() -> params_module.TrainParams:
    return params_module.from_dict(tiny_params_dict()).train


@pytest.fixture(scope="module")
def source_model(tmp_path_factory: pytest.TempPathFactory, tiny_train_params) -> Path:
    """A tiny model trained on set A (conftest's learnable images), saved as models/model.pt is."""
    folder = tmp_path_factory.mktemp("source")
    params = tiny_train_params.model_copy(update=dict(epochs=3))
    result = train(params, CONFIG, make_split(400, 1), make_split(100, 2), CPU, folder / "resume.pt")
    assert result.best_val_accuracy > 0.5
    save_model(folder / "model.pt", CONFIG, result.best_state)
    return folder / "model.pt"


def model_keys(config: dict) -> list[str]:
    return [key for key in build_model(config).state_dict() if key not in FRESH]


def test_fine_tuning_on_another_data_set_beats_a_cold_start(
    source_model: Path, tiny_train_params, tmp_path: Path
) -> None:
    params = tiny_train_params.model_copy(update=dict(epochs=1, init_from=str(source_model)))
    data = (target_split(300, 3), target_split(100, 4))
    cold = train(params, TARGET_CONFIG, *data, CPU, tmp_path / "cold.pt")
    warm = train(params, TARGET_CONFIG, *data, CPU, tmp_path / "warm.pt", init_weights=source_model)

    report = warm.warm_start
    assert report is not None and cold.warm_start is None
    assert report.matched == model_keys(TARGET_CONFIG)
    assert report.missing == report.unexpected == report.skipped == []
    assert report.sha256 == hashlib.sha256(source_model.read_bytes()).hexdigest()
    # Normalisation comes from the new data set's statistics, not from the file (which holds set A's).
    assert torch.load(source_model, weights_only=True)["state_dict"]["mean"].item() == pytest.approx(0.2)
    assert warm.best_state["mean"].item() == pytest.approx(0.31)
    assert warm.best_state["std"].item() == pytest.approx(0.27)
    # The point of it: after one epoch the warm start is far ahead.
    assert warm.history[0]["train_loss"] < 0.5 * cold.history[0]["train_loss"], (warm.history, cold.history)
    assert warm.history[0]["val_loss"] < cold.history[0]["val_loss"]
    # Still bit-reproducible.
    again = train(params, TARGET_CONFIG, *data, CPU, tmp_path / "again.pt", init_weights=source_model)
    assert state_hash(again.best_state) == state_hash(warm.best_state)


def test_warm_start_takes_weights_not_optimiser_state(
    source_model: Path, tiny_train_params, tmp_path: Path
) -> None:
    """A training checkpoint as init_from: the same weights with an optimiser state (momentum buffers) beside
    them. The run must equal one started from the bare weights: a fresh optimiser and schedule."""
    state = torch.load(source_model, weights_only=True)["state_dict"]
    model = build_model(CONFIG)
    model.load_state_dict(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    model(torch.rand(4, 1, 28, 28)).sum().backward()
    optimizer.step()  # momentum buffers now exist; the step also moved the weights, so save the old ones
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "epoch": 3}, checkpoint)
    assert torch.load(checkpoint, weights_only=True)["optimizer"]["state"], "the file must hold momentum"

    params = tiny_train_params.model_copy(update=dict(epochs=1, init_from="x"))
    data = (target_split(300, 3), target_split(100, 4))
    from_model = train(params, TARGET_CONFIG, *data, CPU, tmp_path / "a.pt", init_weights=source_model)
    from_checkpoint = train(params, TARGET_CONFIG, *data, CPU, tmp_path / "b.pt", init_weights=checkpoint)
    assert state_hash(from_model.final_checkpoint["model"]) == state_hash(
        from_checkpoint.final_checkpoint["model"]
    )
    cold = train(params, TARGET_CONFIG, *data, CPU, tmp_path / "c.pt")
    assert from_checkpoint.history[0]["lr"] == cold.history[0]["lr"]  # the schedule starts afresh too


@pytest.mark.parametrize(
    ("change", "skipped"),
    [
        ({"image_shape": [3, 28, 28], "mean": [0.5] * 3, "std": [0.25] * 3}, [STEM]),  # grayscale into RGB
        ({"classes": ["a", "b", "c", "d", "e"]}, ["network.head.weight", "network.head.bias"]),  # 5 classes
    ],
)
def test_a_shape_mismatch_is_skipped_and_freshly_initialised(
    source_model: Path, change: dict, skipped: list[str]
) -> None:
    config = {**CONFIG, **change}
    torch.manual_seed(7)
    cold = build_model(config).state_dict()
    torch.manual_seed(7)
    model, report = load_initial_weights(config, source_model)
    saved = torch.load(source_model, weights_only=True)["state_dict"]

    assert [entry.split(" ")[0] for entry in report.skipped] == skipped
    assert report.matched == [key for key in model_keys(config) if key not in skipped]
    assert report.missing == report.unexpected == []
    state = model.state_dict()
    for key in skipped:  # exactly the values a cold start with the same seed gives
        assert torch.equal(state[key], cold[key]) and state[key].shape != saved[key].shape
    for key in report.matched:
        assert torch.equal(state[key], saved[key])
    assert torch.equal(state["mean"], cold["mean"])
    lines = "\n".join(report.lines())
    assert f"skipped for a shape mismatch (freshly initialised): {skipped[0]} (file " in lines
    if skipped == [STEM]:
        assert "(file 4x1x2x2, model 4x3x2x2)" in lines
    assert model(torch.rand(2, *config["image_shape"])).shape == (2, len(config["classes"]))


def test_missing_and_unexpected_keys_are_reported(source_model: Path, tmp_path: Path) -> None:
    state = dict(torch.load(source_model, weights_only=True)["state_dict"])
    del state["network.head.bias"]
    state["network.extra.weight"] = torch.zeros(3)
    path = tmp_path / "weights.pt"
    torch.save(state, path)  # a plain state dict, as models/export/weights.pt
    _, report = load_initial_weights(CONFIG, path)
    assert report.missing == ["network.head.bias"]
    assert report.unexpected == ["network.extra.weight"]
    lines = "\n".join(report.lines())
    assert "missing (in the model, not in the file; freshly initialised): network.head.bias" in lines
    assert "unexpected (in the file, not in the model; ignored): network.extra.weight" in lines
    assert "normalisation (mean, std): from this data set's meta.json" in lines


def test_loading_maps_the_file_into_a_meta_device_model(
    source_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loaded parameters are the memory-mapped tensors themselves (assign=True onto a meta-device model):
    same data pointer as what torch.load returned, so nothing was allocated and copied. A copy-based load would
    give other pointers. Changing them in place copies the page (MAP_PRIVATE) and never writes the file."""
    loads, devices = [], []
    real_load, real_build = torch.load, warm_start.build_model

    def spy_load(*args, **kwargs):
        loads.append((kwargs, result := real_load(*args, **kwargs)))
        return result

    def spy_build(config):
        devices.append(torch.empty(()).device.type)  # the default device the model is built under
        return real_build(config)

    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(warm_start, "build_model", spy_build)
    path = tmp_path / "model.pt"
    path.write_bytes(source_model.read_bytes())
    model, report = load_initial_weights(CONFIG, path)

    ((kwargs, saved),) = loads
    assert kwargs["weights_only"] is True and kwargs["mmap"] is True
    assert devices == ["cpu", "meta"]  # a cold start's values for what the file lacks, then the real model
    file_tensors = saved["state_dict"]
    params = dict(model.named_parameters())
    assert set(params) <= set(report.matched)
    for key, parameter in params.items():
        assert parameter.device.type == "cpu" and parameter.requires_grad
        assert parameter.data_ptr() == file_tensors[key].data_ptr(), key
    before = path.read_bytes()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert path.read_bytes() == before


class RunsCode:
    """A pickle that, if unpickled, would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_bad_files_are_refused_in_one_line(source_model: Path, tmp_path: Path) -> None:
    def refused(path: Path, pattern: str) -> None:
        with pytest.raises(UserError, match=pattern) as raised:
            load_initial_weights(CONFIG, path)
        assert "\n" not in str(raised.value)

    refused(tmp_path / "nothere.pt", r"train.init_from: .*nothere.pt does not exist")
    with pytest.raises(UserError, match=r"nothere.pt does not exist"):
        resolve(str(tmp_path / "nothere.pt"), TrackingParams(), tmp_path)

    marker = tmp_path / "code-ran"
    torch.save({"weights": RunsCode(marker)}, tmp_path / "evil.pt")
    refused(
        tmp_path / "evil.pt",
        r"holds Python code or objects, not plain tensors .*system.*refusing to unpickle",
    )
    assert not marker.exists()
    with (tmp_path / "plain.pkl").open("wb") as file:  # plain pickle, not torch.save: no code runs either
        pickle.dump(RunsCode(marker), file)
    refused(tmp_path / "plain.pkl", r"cannot load .*plain.pkl: not a zip-format torch.save file")
    assert not marker.exists()

    torch.save({"epochs": 3, "note": "hello"}, tmp_path / "notes.pt")
    refused(tmp_path / "notes.pt", r"notes.pt is not a weights file \(expected a state dict")
    (tmp_path / "text.pt").write_text("not a torch file")
    refused(tmp_path / "text.pt", r"cannot load .*text.pt: not a zip-format torch.save file")

    torch.save(build_model({**CONFIG, "model": "mlp"}).state_dict(), tmp_path / "mlp.pt")
    refused(tmp_path / "mlp.pt", r"no weights in .*mlp.pt match this model \(9 tensors in the file, 0 with a")
    # Names all match, shapes none (but batch norm's step counters): as wrong as no names at all.
    torch.save(build_model({**CONFIG, "width": 8, "classes": ["a", "b"]}).state_dict(), tmp_path / "wide.pt")
    refused(
        tmp_path / "wide.pt", r"no weights in .*wide.pt match .*, 17 with a matching name but another shape"
    )

    # The train stage's own outputs: DVC deletes them before training.
    with pytest.raises(UserError, match=r"models/model.pt is the train stage's own output"):
        resolve("models/model.pt", TrackingParams(), tmp_path)


def test_a_resume_checkpoint_takes_precedence_over_init_from(
    source_model: Path, tiny_train_params, tmp_path: Path
) -> None:
    params = tiny_train_params.model_copy(update=dict(epochs=2, init_from=str(source_model)))
    data = (target_split(300, 3), target_split(100, 4))
    whole = train(params, TARGET_CONFIG, *data, CPU, tmp_path / "whole.pt", init_weights=source_model)

    def stop(stats: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            params, TARGET_CONFIG, *data, CPU, tmp_path / "cut.pt", on_epoch=stop, init_weights=source_model
        )
    # On resume the file is not read at all (a path that does not exist proves it); the report comes back.
    resumed = train(params, TARGET_CONFIG, *data, CPU, tmp_path / "cut.pt", init_weights=tmp_path / "gone.pt")
    assert state_hash(resumed.best_state) == state_hash(whole.best_state)
    assert resumed.warm_start == whole.warm_start


def test_resume_fingerprint_covers_the_init_file(tmp_path: Path) -> None:
    data, init = tmp_path / "train.pt", tmp_path / "init.pt"
    data.write_bytes(b"data")
    init.write_bytes(b"weights v1")
    flat = {"train.init_from": str(init)}
    first = resume_path(tmp_path, flat, [data, init])
    init.write_bytes(b"weights v2")  # same path, same params, other file
    assert resume_path(tmp_path, flat, [data, init]) != first


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    params = TrackingParams(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="warm")
    tracking.connect(params)
    yield params
    if mlflow.active_run():
        mlflow.end_run()


def test_models_uri_resolves_to_the_registered_weights(store: TrackingParams, tmp_path: Path) -> None:
    registered = []
    for seed, accuracy in ((1, 0.9), (2, 0.5)):  # version 1 becomes champion, version 2 only candidate
        torch.manual_seed(seed)
        model = build_model(CONFIG).eval()
        with mlflow.start_run():
            tracking.log_and_register_model(model, example_input(CONFIG), "tiny-a", accuracy)
        registered.append(model.state_dict())

    for uri, version in (
        ("models:/tiny-a@champion", 0),
        ("models:/tiny-a@candidate", 1),
        ("models:/tiny-a/2", 1),
    ):
        path, what = resolve(uri, store, tmp_path / "downloads" / str(version))
        assert what == f"tiny-a version {version + 1}"
        loaded, report = load_initial_weights(TARGET_CONFIG, path, uri)
        assert report.source == uri and report.matched == model_keys(CONFIG)
        state = loaded.state_dict()
        assert all(torch.equal(state[key], registered[version][key]) for key in report.matched)

    def refused(uri: str, pattern: str) -> None:
        with pytest.raises(UserError, match=pattern) as raised:
            resolve(uri, store, tmp_path)
        assert "\n" not in str(raised.value)

    refused("models:/tiny-a@best", r"model 'tiny-a' has no alias 'best'; its aliases: @candidate, @champion")
    refused("models:/tiny-b@champion", r"no registered model 'tiny-b' in sqlite:///.*; known: tiny-a")
    refused("models:/tiny-a/7", r"model 'tiny-a' has no version 7; its versions: 1, 2")
    refused("models:/tiny-a", r"write models:/<name>@<alias> or models:/<name>/<version>")


def write_target_idx(folder: Path) -> None:
    """The target set as IDX files under Fashion-MNIST's names, as fetch leaves them in data/raw."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, size, seed in (("train", 400, 5), ("t10k", 100, 6)):
        split = target_split(size, seed)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(split.images[:, 0].contiguous()))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(split.labels.to(torch.uint8)))


@pytest.mark.slow
def test_train_stage_prints_and_logs_the_warm_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = copy_repo(tmp_path / "repo")
    write_target_idx(repo / "data/raw")
    uri = f"sqlite:///{repo / 'mlruns/mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "DVC_ROOT": str(repo)}

    def stage(init_from: str, check: bool = True):
        write_params(repo, tiny_params_dict(train={"epochs": 1, "init_from": init_from}))
        return run(["python", "stages/train.py"], cwd=repo, env=env, check=check)

    write_params(repo, tiny_params_dict())
    run(["python", "stages/preprocess.py"], cwd=repo, env=env)

    # Register set A's model in the repository's own store, as an earlier export stage would have.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        tracking.connect(TrackingParams())
        # The cnn layout the train stage builds (models.model_config), so that every tensor matches.
        torch.manual_seed(0)
        model = build_model(STAGE_CONFIG)
        with mlflow.start_run():
            tracking.log_and_register_model(model.eval(), example_input(STAGE_CONFIG), "tiny-a", 0.9)
    finally:
        if mlflow.active_run():
            mlflow.end_run()

    output = stage("models:/tiny-a@champion").stdout
    assert "warm start from models:/tiny-a@champion (sha256 " in output
    assert f"{len(model_keys(STAGE_CONFIG))} matched, 0 missing, 0 unexpected, 0 skipped" in output
    assert f"  matched: {STEM}, " in output
    assert "normalisation (mean, std): from this data set's meta.json, not from the file" in output

    run_id = tracking.read_run_id(repo / "reports/train/mlflow_run.json")
    tags = MlflowClient(uri).get_run(run_id).data.tags
    downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-a/1/{tracking.WEIGHTS_ARTIFACT}"))
    assert tags["init_from"] == "models:/tiny-a@champion"
    assert tags["init_from.resolved"] == "tiny-a version 1"
    assert tags["init_from.sha256"] == hashlib.sha256(downloaded.read_bytes()).hexdigest()
    assert (
        tags["init_from.matched"] == str(len(model_keys(STAGE_CONFIG))) and tags["init_from.skipped"] == "0"
    )
    assert not list((repo / "data/resume").glob("*.pt"))

    failed = stage("models/model.pt", check=False)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [
        "error: train.init_from: models/model.pt is the train stage's own output, which DVC deletes before "
        "training; copy it first (cp models/model.pt warm/model.pt) and point at the copy, or use "
        "models:/<name>@<alias>"
    ]
