"""The params.yaml schema: one dataclass per section, validated before a stage does any work.

Every error names the key, the value and what is allowed, on one line, so a typo costs seconds, not a run.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from image_classifier.errors import UserError

PARAMS_FILE = Path("params.yaml")


class ParamsError(UserError):
    """params.yaml is malformed or holds a value that is not allowed."""


@dataclass(frozen=True)
class DataParams:
    dataset: str
    path: str
    image_size: int
    channels: int

    def check(self) -> None:
        _require(bool(self.path.strip()), "data.path", self.path, "a folder or CSV path")
        # The CNN halves the resolution three times, so 8 pixels is the least it can take.
        _require(8 <= self.image_size <= 1024, "data.image_size", self.image_size, "8 to 1024 pixels")
        _require(self.channels in (1, 3), "data.channels", self.channels, "1 (grayscale) or 3 (RGB)")


@dataclass(frozen=True)
class FetchParams:
    local_dirs: list[str]
    mirrors: list[str]
    timeout_s: float

    def check(self) -> None:
        _require(self.timeout_s > 0, "fetch.timeout_s", self.timeout_s, "a number of seconds above 0")


@dataclass(frozen=True)
class PreprocessParams:
    val_size: float
    test_size: float
    train_subset: int
    seed: int

    def check(self) -> None:
        for key in ("val_size", "test_size"):
            value = getattr(self, key)
            _require(
                value >= 0 and (value < 1 or value == int(value)),
                f"preprocess.{key}",
                value,
                "a count of images (0, 1, 2, ...) or a fraction below 1",
            )
        _require(self.train_subset >= 0, "preprocess.train_subset", self.train_subset, "0 (all) or a count")


@dataclass(frozen=True)
class TrainParams:
    model: Literal["mlp", "cnn"]
    width: int
    epochs: int
    batch_size: int
    optimizer: Literal["sgd", "adamw"]
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: Literal["none", "onecycle", "cosine"]
    label_smoothing: float
    crop_padding: int
    flip: bool
    test_time_flip: bool
    calibrate: bool
    seed: int
    device: Literal["auto", "cpu", "cuda", "mps", "xpu"]
    precision: Literal["auto", "fp32", "bf16"]
    channels_last: bool
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"]
    threads: int
    processes: int
    init_from: str

    def check(self) -> None:
        _require(1 <= self.processes <= 64, "train.processes", self.processes, "1 to 64 processes")
        _require(self.width >= 1, "train.width", self.width, "an integer >= 1")
        _require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _require(0 < self.lr <= 10, "train.lr", self.lr, "a number in (0, 10]")
        _require(0 <= self.momentum < 1, "train.momentum", self.momentum, "a number in [0, 1)")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "[0, 1)")
        _require(0 <= self.crop_padding <= 8, "train.crop_padding", self.crop_padding, "0 to 8 pixels")
        _require(self.threads >= 0, "train.threads", self.threads, "0 (all cores) or a count")
        if self.nesterov and self.optimizer == "sgd":
            _require(self.momentum > 0, "train.nesterov", self.nesterov, "false when train.momentum is 0")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    misclassified: int

    def check(self) -> None:
        _require(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "an integer >= 1")
        _require(1 <= self.misclassified <= 100, "evaluate.misclassified", self.misclassified, "1 to 100")


@dataclass(frozen=True)
class ExportParams:
    opset: int
    max_logit_diff: float

    def check(self) -> None:
        _require(17 <= self.opset <= 23, "export.opset", self.opset, "an ONNX opset from 17 to 23")
        _require(self.max_logit_diff > 0, "export.max_logit_diff", self.max_logit_diff, "a number above 0")


@dataclass(frozen=True)
class TrackingParams:
    """Where MLflow runs go. Not a DVC param: pointing at a team server must not rerun stages."""

    uri: str = ""
    experiment: str = "image-classifier"
    model_name: str = ""


@dataclass(frozen=True)
class Params:
    data: DataParams
    fetch: FetchParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    tracking: TrackingParams = field(default_factory=TrackingParams)

    def flat(self) -> dict[str, Any]:
        """Every value as `section.key`, the form MLflow params and `dvc exp run -S` use."""
        return {
            f"{section}.{key}": value
            for section, values in dataclasses.asdict(self).items()
            for key, value in values.items()
        }


def load(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamsError with one line naming the problem."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ParamsError(f"cannot read {path}: {error.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ParamsError(f"{path}: YAML syntax error{where}: {problem}") from None
    return from_dict(raw if raw is not None else {}, source=str(path))


def from_dict(raw: Any, source: str = "params") -> Params:
    """Build Params from plain data, checking keys, types and ranges."""
    params = _build(Params, raw, prefix="", source=source)
    for section in dataclasses.fields(params):
        check = getattr(getattr(params, section.name), "check", None)
        if check:
            check()
    return params


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: {where} must be a mapping of keys to values, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ParamsError(f"{source}: unknown key '{prefix}{key}'{hint}")
    values = {}
    for name, spec in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            has_default = (
                spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING
            )
            if dataclasses.is_dataclass(hints[name]) and not has_default:
                raise ParamsError(f"{source}: missing section '{key}'")
            if not has_default:
                raise ParamsError(f"{source}: missing key '{key}'")
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], prefix=f"{key}.", source=source)
        else:
            values[name] = _coerce(raw[name], hint, key, source)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            suggestion = f" (did you mean '{close[0]}'?)" if close else ""
            raise ParamsError(
                f"{source}: {key} = {value!r} is not allowed; use one of {', '.join(map(str, allowed))}{suggestion}"
            )
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ParamsError(f"{source}: {key} = {value!r} must be a list")
        return [_coerce(item, item_type, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unions are not supported in the params schema: {key}")
    # bool is an int in Python; `epochs: true` must still be refused.
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[hint]
    if not ok:
        # PyYAML (YAML 1.1) reads 1e-3 as text: only 1.0e-3 or 0.001 are numbers.
        tip = ""
        if hint is float and isinstance(value, str) and _is_number(value):
            number = yaml.safe_dump(float(value)).splitlines()[0]
            tip = f"; write it as {number} (quotes, or an exponent without a dot like 1e-3, make YAML read text)"
        raise ParamsError(
            f"{source}: {key} = {value!r} must be {hint.__name__}, not {type(value).__name__}{tip}"
        )
    return value  # an int stays an int where a float is allowed (PEP 484 numeric tower): 5000, not 5000.0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split_size(value: float, total: int) -> int:
    """A `val_size`/`test_size` as a count of images: a fraction below 1 of `total`, or the count itself."""
    return round(value * total) if 0 < value < 1 else int(value)


def _require(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ParamsError(f"params.yaml: {key} = {value!r} is out of range; allowed: {allowed}")
