"""params.yaml validation: every mistake stops with one line naming the key, the value and what is allowed."""

import time
from pathlib import Path

import pytest
from conftest import REPO, default_params, run, tiny_params_dict

from image_classifier import params as params_module
from image_classifier.params import ParamsError


def test_repository_params_file_is_valid() -> None:
    params = params_module.load(REPO / "params.yaml")
    assert params.train.model in ("cnn", "mlp")
    flat = params.flat()
    assert flat["train.lr"] == params.train.lr
    assert "tracking.uri" in flat


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "lr", 0.0, "train.lr = 0.0 is out of range"),
        ("train", "lr", -0.1, "train.lr = -0.1 is out of range"),
        ("train", "epochs", 0, "train.epochs = 0 is out of range"),
        ("train", "epochs", True, "train.epochs = True must be int"),
        ("train", "batch_size", "64", "train.batch_size = '64' must be int"),
        ("train", "calibrate", "yes", "train.calibrate = 'yes' must be bool"),
        ("train", "model", "resnet", "train.model = 'resnet' is not allowed; use one of mlp, cnn"),
        ("train", "optimizer", "adam", "did you mean 'adamw'?"),
        ("train", "schedule", "cosin", "did you mean 'cosine'?"),
        ("train", "device", "tpu", "train.device = 'tpu' is not allowed"),
        ("fetch", "local_dirs", "/data", "fetch.local_dirs = '/data' must be a list"),
        ("preprocess", "val_size", -1, "preprocess.val_size = -1 is out of range"),
    ],
)
def test_bad_values_name_key_value_and_rule(section: str, key: str, value: object, message: str) -> None:
    raw = tiny_params_dict(**{section: {key: value}})
    with pytest.raises(
        ParamsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")
    ):
        params_module.from_dict(raw)


def test_unknown_key_at_any_depth_suggests_the_closest() -> None:
    raw = default_params()
    raw["train"]["learning_rate"] = raw["train"].pop("lr")
    with pytest.raises(ParamsError, match=r"unknown key 'train.learning_rate'"):
        params_module.from_dict(raw)
    raw = default_params()
    raw["trian"] = raw.pop("train")
    with pytest.raises(ParamsError, match=r"unknown key 'trian'; did you mean 'train'\?"):
        params_module.from_dict(raw)
    raw = default_params()
    raw["train"]["epoch"] = 3
    with pytest.raises(ParamsError, match=r"unknown key 'train.epoch'; did you mean 'train.epochs'\?"):
        params_module.from_dict(raw)


def test_missing_section_and_key() -> None:
    raw = default_params()
    del raw["evaluate"]
    with pytest.raises(ParamsError, match="missing section 'evaluate'"):
        params_module.from_dict(raw)
    raw = default_params()
    del raw["train"]["seed"]
    with pytest.raises(ParamsError, match=r"missing key 'train\.seed'"):
        params_module.from_dict(raw)


def test_tracking_section_is_optional() -> None:
    raw = default_params()
    del raw["tracking"]
    assert params_module.from_dict(raw).tracking.experiment == "image-classifier"


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: [1, 2\n")
    with pytest.raises(ParamsError, match=r"YAML syntax error at line \d+, column \d+"):
        params_module.load(path)


def test_stage_refuses_a_typo_quickly_with_exit_status_2(tmp_path: Path) -> None:
    text = (REPO / "params.yaml").read_text().replace("  epochs:", "  epohcs:")
    (tmp_path / "params.yaml").write_text(text)
    started = time.perf_counter()
    result = run(["python", str(REPO / "stages" / "train.py")], cwd=tmp_path, check=False)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: params.yaml: unknown key 'train.epohcs'; did you mean 'train.epochs'?"]
    print(f"typo refused in {elapsed:.1f}s")
