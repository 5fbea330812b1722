"""The search space of `tune`: which params a study varies and over what, read from tune.yaml.

    train.lr: {low: 0.02, high: 0.5, log: true}      # a float range (log scale)
    train.width: {low: 8, high: 32, step: 8}         # an int range: both ends integers
    train.optimizer: {choices: [sgd, adamw]}         # a set of values

Keys are `train.*` params and `data.image_size`. The file is checked like params.yaml, in one line: its shape
here, and every value it can produce (both ends of a range, every choice) by params.py's own schema, so a
trial never fails on a value the file allowed.
"""

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from image_classifier import params as params_module
from image_classifier.errors import UserError, one_line

# data.image_size is the one key outside train.*: a trial resizes the processed images to it (tune.py).
OTHER_KEYS = ("data.image_size",)


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    low: int | float
    high: int | float
    log: bool = False
    step: int | float | None = None

    @property
    def is_int(self) -> bool:
        return all(isinstance(value, int) for value in (self.low, self.high, self.step or 1))


class Choices(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    choices: list[Any] = Field(min_length=1)


Dimension = Range | Choices


def load_space(path: Path, base: dict[str, Any]) -> dict[str, Dimension]:
    """The search space in `path`, each dimension checked against the params schema with `base` (params.yaml as
    plain data) as the rest of the params. Raises UserError with one line naming the key."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UserError(f"cannot read the search space {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not YAML ({one_line(error, limit=120)})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: must map param keys (train.lr, ...) to ranges or choices")
    return {key: _dimension(path, key, value, base) for key, value in raw.items()}


def _dimension(path: Path, key: str, value: Any, base: dict[str, Any]) -> Dimension:
    section, _, name = str(key).partition(".")
    if key not in OTHER_KEYS and (section != "train" or name not in params_module.TrainParams.model_fields):
        raise UserError(f"{path}: {key!r} is not a train.* param or data.image_size")
    if not isinstance(value, dict):
        raise UserError(f"{path}: {key} must be {{low: ..., high: ...}} or {{choices: [...]}}, not {value!r}")
    kind = Choices if "choices" in value else Range
    try:
        dimension = kind.model_validate(value)
    except ValidationError as error:
        # A misspelt key is both unknown and missing: the unknown one is the cause.
        first = min(error.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{path}: {key}.{where}: {first['msg']}") from None
    if isinstance(dimension, Choices) and not all(
        isinstance(c, (str, int, float, bool)) for c in dimension.choices
    ):
        raise UserError(f"{path}: {key}: choices must be numbers, text or true/false")
    if isinstance(dimension, Range):
        if dimension.log and dimension.step is not None:
            raise UserError(f"{path}: {key}: a range takes a log scale or a step, not both")
        if not dimension.low < dimension.high:
            raise UserError(f"{path}: {key}: low ({dimension.low}) must be below high ({dimension.high})")
        if dimension.log and dimension.low <= 0:
            raise UserError(f"{path}: {key}: a log scale needs low > 0, not {dimension.low}")
    values = dimension.choices if isinstance(dimension, Choices) else [dimension.low, dimension.high]
    for candidate in values:
        try:
            params_module.from_dict(with_values(base, {key: candidate}), source=str(path))
        except params_module.ParamsError as error:
            raise UserError(str(error)) from None
    return dimension


def with_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Params as plain data with `section.key` values replaced (the form `dvc exp run -S` takes)."""
    raw = {section: dict(keys) if isinstance(keys, dict) else keys for section, keys in base.items()}
    for key, value in values.items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    return raw


def suggest(trial: Any, space: dict[str, Dimension]) -> dict[str, Any]:
    """One value per dimension from an Optuna trial (its sampler decides)."""
    values = {}
    for key, dimension in space.items():
        if isinstance(dimension, Choices):
            values[key] = trial.suggest_categorical(key, dimension.choices)
        elif dimension.is_int:
            values[key] = trial.suggest_int(
                key, dimension.low, dimension.high, step=dimension.step or 1, log=dimension.log
            )
        else:
            values[key] = trial.suggest_float(
                key, dimension.low, dimension.high, step=dimension.step, log=dimension.log
            )
    return values
