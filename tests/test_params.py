"""params.yaml validation: every mistake stops with one line naming the key, the value and what is allowed."""

import time
from pathlib import Path

import pytest
from conftest import REPO, default_params, run, tiny_params_dict
from pydantic import ValidationError

from image_classifier import params as params_module
from image_classifier.params import ParamsError


def test_repository_params_file_is_valid() -> None:
    params = params_module.load(REPO / "params.yaml")
    assert params.train.model in ("auto", "cnn", "convnet", "mlp")
    flat = params.flat()
    assert flat["train.lr"] == params.train.lr
    assert "tracking.uri" in flat


def refusal(raw: object) -> str:
    """The one line from_dict refuses `raw` with."""
    with pytest.raises(ParamsError) as caught:
        params_module.from_dict(raw)
    return str(caught.value)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "lr", 0.0, "train.lr = 0.0 is out of range; allowed: a number in (0, 10] or 'auto'"),
        ("train", "lr", -0.1, "train.lr = -0.1 is out of range"),
        ("train", "lr", float("nan"), "train.lr = nan is out of range"),
        ("train", "lr", True, "train.lr = True must be a number in (0, 10] or 'auto', not bool"),
        ("train", "epochs", 0, "train.epochs = 0 is out of range; allowed: an integer >= 1 or 'auto'"),
        ("train", "epochs", True, "train.epochs = True must be an integer >= 1 or 'auto', not bool"),
        ("train", "epochs", "ten", "train.epochs = 'ten' must be an integer >= 1 or 'auto', not str"),
        ("train", "epochs", 2.0, "train.epochs = 2.0 must be an integer >= 1 or 'auto', not float"),
        ("train", "target_steps", "64", "train.target_steps = '64' must be int, not str"),
        ("train", "target_steps", True, "train.target_steps = True must be int, not bool"),
        ("train", "batch_size", "64", "train.batch_size = '64' must be an integer >= 1 or 'auto', not str"),
        ("train", "batch_size", 0, "train.batch_size = 0 is out of range; allowed: an integer >= 1"),
        ("train", "target_steps", 0, "train.target_steps = 0 is out of range; allowed: an integer >= 1"),
        ("train", "patience", -1, "train.patience = -1 is out of range; allowed: 0 (off)"),
        ("train", "ema", "yes", "train.ema = 'yes' must be bool, not str"),
        ("train", "calibrate", "yes", "train.calibrate = 'yes' must be bool, not str"),
        ("train", "ema_decay", 1, "train.ema_decay = 1 is out of range; allowed: a number in [0, 1)"),
        ("train", "class_weights", "balance", "use one of none, balanced (did you mean 'balanced'?)"),
        (
            "train",
            "model",
            "resnet",
            "train.model = 'resnet' is out of range; allowed: auto, mlp, cnn, convnet or timm:<architecture> "
            "(timm:resnet18, ...); did you mean 'timm:resnet'?",
        ),
        ("train", "optimizer", "adam", "did you mean 'adamw'?"),
        ("train", "schedule", "cosin", "did you mean 'cosine'?"),
        ("train", "device", "tpu", "train.device = 'tpu' is not allowed"),
        ("data", "image_size", 4, "data.image_size = 4 is out of range; allowed: 8 to 1024 pixels or 'auto'"),
        ("data", "image_size", 2000, "data.image_size = 2000 is out of range"),
        (
            "data",
            "channels",
            2,
            "data.channels = 2 is out of range; allowed: 1 (grayscale), 3 (RGB) or 'auto'",
        ),
        ("data", "channels", True, "data.channels = True must be 1 (grayscale), 3 (RGB) or 'auto', not bool"),
        ("data", "channels", 3.0, "data.channels = 3.0 must be"),
        ("fetch", "local_dirs", "/data", "fetch.local_dirs = '/data' must be a list"),
        # Relative to the logits' scale since issue 24: a share, so 1 or more cannot be meant.
        (
            "export",
            "max_logit_diff",
            1,
            "export.max_logit_diff = 1 is out of range; allowed: a share above 0",
        ),
        ("export", "max_logit_diff", 0, "export.max_logit_diff = 0 is out of range"),
        ("fetch", "local_dirs", ["/data", 5], "fetch.local_dirs[1] = 5 must be str, not int"),
        ("preprocess", "val_size", -1, "preprocess.val_size = -1 is out of range"),
        (
            "preprocess",
            "val_size",
            1.5,
            "preprocess.val_size = 1.5 is out of range; allowed: a count of images",
        ),
        ("preprocess", "test_size", "half", "preprocess.test_size = 'half' must be a count of images"),
    ],
)
def test_bad_values_name_key_value_and_rule(section: str, key: str, value: object, message: str) -> None:
    line = refusal(tiny_params_dict(**{section: {key: value}}))
    assert message in line
    assert "\n" not in line and "validation error" not in line  # never pydantic's own multi-line report


def test_auto_is_accepted_where_the_pipeline_can_choose() -> None:
    auto = {"image_size": "auto", "channels": "auto"}
    raw = tiny_params_dict(
        data=auto,
        preprocess={"val_size": "auto", "test_size": "auto"},
        train={"epochs": "auto", "model": "auto", "batch_size": "auto"},
    )
    params = params_module.from_dict(raw)
    assert (params.data.image_size, params.data.channels, params.train.epochs) == ("auto", "auto", "auto")
    assert (params.preprocess.val_size, params.preprocess.test_size) == ("auto", "auto")
    assert (params.train.model, params.train.batch_size) == ("auto", "auto")


@pytest.mark.parametrize(
    "name",
    [
        "train.momentum",
        "train.target_steps",
        "train.ema_decay",
        "train.ema",
        "evaluate.misclassified",
    ],
)
def test_auto_is_refused_elsewhere_in_one_line_naming_the_key(name: str) -> None:
    section, key = name.split(".")
    line = refusal(tiny_params_dict(**{section: {key: "auto"}}))
    assert line.startswith(f"params: {name} = 'auto' must be ")
    assert "\n" not in line


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("data", "image_size", 8),
        ("data", "image_size", 1024),
        ("data", "channels", 1),
        ("data", "channels", 3),
        ("preprocess", "val_size", 0),
        ("preprocess", "val_size", 5000),
        ("preprocess", "test_size", 0.2),
        ("train", "epochs", 1),
        ("train", "patience", 0),
        ("train", "ema_decay", 0.0),
        ("train", "class_weights", "balanced"),
        ("export", "max_logit_diff", 0.5),
    ],
)
def test_values_at_the_edges_are_accepted(section: str, key: str, value: object) -> None:
    params = params_module.from_dict(tiny_params_dict(**{section: {key: value}}))
    assert getattr(getattr(params, section), key) == value


def test_an_int_given_for_a_float_stays_an_int() -> None:
    raw = tiny_params_dict(train={"lr": 1}, fetch={"timeout_s": 30}, preprocess={"val_size": 5000})
    flat = params_module.from_dict(raw).flat()
    # 5000 and 30, not 5000.0 and 30.0: MLflow shows the params as written, and the resume fingerprint is stable.
    assert [(flat[k], type(flat[k])) for k in ("train.lr", "fetch.timeout_s", "preprocess.val_size")] == [
        (1, int),
        (30, int),
        (5000, int),
    ]
    assert type(params_module.from_dict(tiny_params_dict(train={"lr": 1.0})).train.lr) is float


def test_exponent_without_a_dot_gets_a_tip(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("  lr: auto ", "  lr: 1e-3 "))
    with pytest.raises(ParamsError) as caught:
        params_module.load(path)
    assert (
        f"{path}: train.lr = '1e-3' must be a number in (0, 10] or 'auto', not str; write it as 0.001 (quotes"
        in str(caught.value)
    )


def test_params_are_frozen() -> None:
    params = params_module.from_dict(tiny_params_dict())
    with pytest.raises(ValidationError, match="frozen"):
        params.train.lr = 0.5  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        params.train = params.train  # type: ignore[misc]
    assert params.train.lr == "auto"


def test_nesterov_needs_momentum_with_sgd() -> None:
    line = refusal(tiny_params_dict(train={"optimizer": "sgd", "momentum": 0, "nesterov": True}))
    assert line == "params: train.nesterov = True is out of range; allowed: false when train.momentum is 0"
    params_module.from_dict(tiny_params_dict(train={"optimizer": "adamw", "momentum": 0, "nesterov": True}))


def test_a_section_or_the_file_that_is_not_a_mapping() -> None:
    assert (
        refusal(tiny_params_dict() | {"train": 5})
        == "params: train must be a mapping of keys to values, got 5"
    )
    assert refusal([1]) == "params: the top level must be a mapping of keys to values, got [1]"


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
