"""The params.yaml schema: one pydantic model per section, validated before a stage does any work.

pydantic checks keys, types and ranges; this module turns its first error into one line that names the key, the
value and what is allowed, so a typo costs seconds, not a run. A field's `description` is that "allowed" text.
"""

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from image_classifier.errors import UserError

PARAMS_FILE = Path("params.yaml")


class ParamsError(UserError):
    """params.yaml is malformed or holds a value that is not allowed."""


# --- Value types shared by the sections --------------------------------------------------------------------


def _keep_int(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    number = handler(value)  # type and range checks as a float
    # An int passes where a float is allowed but stays an int, so flat() (MLflow params, the resume
    # fingerprint) shows 5000 as written, not 5000.0.
    return value if type(value) is int else number


def _one_of(*allowed: int) -> AfterValidator:
    def check(value: int) -> int:
        if value not in allowed:
            raise ValueError(f"must be one of {allowed}")
        return value

    return AfterValidator(check)


Number = Annotated[float, WrapValidator(_keep_int)]
Auto = Literal["auto"]  # the pipeline picks the value from the data and the model
Count = Annotated[int, Field(ge=0)]
Fraction = Annotated[Number, Field(gt=0, lt=1)]
SplitSize = Count | Fraction | Auto
SPLIT_SIZE = "a count of images (0, 1, 2, ...), a fraction in (0, 1) or 'auto'"


class _Section(BaseModel):
    # strict: no silent conversion ('64' is not 64, true is not 1); frozen: stages read params, never change them.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --- The sections, in params.yaml's order ------------------------------------------------------------------


class DataParams(_Section):
    dataset: str
    path: str = Field(pattern=r"\S", description="a folder or CSV path")
    # The CNN halves the resolution three times, so 8 pixels is the least it can take.
    image_size: Annotated[int, Field(ge=8, le=1024)] | Auto = Field(description="8 to 1024 pixels or 'auto'")
    channels: Annotated[int, _one_of(1, 3)] | Auto = Field(description="1 (grayscale), 3 (RGB) or 'auto'")


class FetchParams(_Section):
    local_dirs: list[str]
    mirrors: list[str]
    timeout_s: Number = Field(gt=0, description="a number of seconds above 0")


class PreprocessParams(_Section):
    val_size: SplitSize = Field(description=SPLIT_SIZE)
    test_size: SplitSize = Field(description=SPLIT_SIZE)
    train_subset: int = Field(ge=0, description="0 (all) or a count")
    seed: int
    shard_mb: Number = Field(gt=0, le=100_000, description="megabytes per image shard, above 0")


# `timm:<architecture>`: whether timm knows the name is checked by the stage (importing timm takes seconds).
OUR_MODELS = ("auto", "mlp", "cnn", "convnet")
TIMM_MODEL = r"timm:[A-Za-z0-9_.\-]+"
MODEL = "auto, mlp, cnn, convnet or timm:<architecture> (timm:resnet18, ...)"


class TrainParams(_Section):
    model: str = Field(description=MODEL)
    pretrained: str
    freeze_epochs: Annotated[int, Field(ge=0)] | Auto = Field(
        description="0 (no freezing), a count or 'auto'"
    )
    backbone_lr_scale: Annotated[Number, Field(gt=0, le=1)] | Auto = Field(
        description="a number in (0, 1] or 'auto'"
    )
    frozen_stages: int = Field(ge=0, description="0 (every stage trains) or a count of stages")
    width: Annotated[int, Field(ge=1)] | Auto = Field(description="an integer >= 1 or 'auto'")
    epochs: Annotated[int, Field(ge=1)] | Auto = Field(description="an integer >= 1 or 'auto'")
    target_steps: int = Field(ge=1, description="an integer >= 1")
    patience: int = Field(ge=0, description="0 (off) or a count of epochs")
    batch_size: Annotated[int, Field(ge=1)] | Auto = Field(description="an integer >= 1 or 'auto'")
    optimizer: Literal["auto", "sgd", "adamw"]
    lr: Annotated[Number, Field(gt=0, le=10)] | Auto = Field(description="a number in (0, 10] or 'auto'")
    momentum: Number = Field(ge=0, lt=1, description="a number in [0, 1)")
    nesterov: bool = Field(description="false when train.momentum is 0")
    weight_decay: Annotated[Number, Field(ge=0)] | Auto = Field(description="a number >= 0 or 'auto'")
    schedule: Literal["none", "onecycle", "cosine"]
    label_smoothing: Number = Field(ge=0, lt=1, description="[0, 1)")
    class_weights: Literal["none", "balanced"]
    crop_padding: Annotated[int, Field(ge=0, le=64)] | Auto = Field(description="0 to 64 pixels or 'auto'")
    flip: bool
    augment: Literal["auto", "basic", "photo"]
    crop_scale: list[Number] = Field(
        min_length=2, max_length=2, description="[smallest, largest] share of the image, in (0, 1]"
    )
    trivial_augment: bool
    random_erasing: Number = Field(ge=0, le=1, description="a probability in [0, 1]")
    mixup: Number = Field(ge=0, description="0 (off) or a Beta distribution's alpha > 0")
    cutmix: Number = Field(ge=0, description="0 (off) or a Beta distribution's alpha > 0")
    test_time_flip: bool
    calibrate: bool
    ema: bool
    ema_decay: Number = Field(ge=0, lt=1, description="a number in [0, 1)")
    seed: int
    device: Literal["auto", "cpu", "cuda", "mps", "xpu"]
    precision: Literal["auto", "fp32", "bf16"]
    channels_last: bool
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"]
    threads: int = Field(ge=0, description="0 (all cores) or a count")
    processes: int = Field(ge=1, le=64, description="1 to 64 processes")
    data_in_memory: bool | Auto = Field(description="true, false or 'auto'")
    nodes: int = Field(ge=1, le=1024, description="1 to 1024 machines")
    init_from: str

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        if model in OUR_MODELS or re.fullmatch(TIMM_MODEL, model):
            return model
        close = difflib.get_close_matches(model, OUR_MODELS, n=1)
        raise ValueError(f"{HINT}did you mean '{close[0] if close else PREFIX_TIMM + model}'?")

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, nesterov: bool, info: ValidationInfo) -> bool:
        # PyTorch's SGD refuses Nesterov without momentum, but only once training starts; say so now.
        # `info.data` holds the fields above this one that passed (a failed momentum is reported on its own).
        if nesterov and info.data.get("optimizer") in ("sgd", "auto") and info.data.get("momentum") == 0:
            raise ValueError("Nesterov momentum needs momentum")
        return nesterov

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, scale: list[float]) -> list[float]:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError("must be [smallest, largest] with 0 < smallest <= largest <= 1")
        return scale


class EvaluateParams(_Section):
    batch_size: Annotated[int, Field(ge=1)] | Auto = Field(description="an integer >= 1 or 'auto'")
    misclassified: int = Field(ge=1, le=100, description="1 to 100")


class ExportParams(_Section):
    opset: int = Field(ge=17, le=23, description="an ONNX opset from 17 to 23")
    # Relative to the logits' scale (export.parity_failure): above 0, below 1.
    max_logit_diff: Number = Field(gt=0, lt=1, description="a share above 0 and below 1")


class TrackingParams(_Section):
    """Where MLflow runs go. Not a DVC param: pointing at a team server must not rerun stages."""

    uri: str = ""
    experiment: str = "image-classifier"
    model_name: str = ""


class Params(_Section):
    data: DataParams
    fetch: FetchParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    def flat(self) -> dict[str, Any]:
        """Every value as `section.key`, the form MLflow params and `dvc exp run -S` use."""
        return {f"{name}.{key}": value for name, section in self for key, value in section}


# --- Loading -----------------------------------------------------------------------------------------------


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
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"{source}: {_describe(error.errors(include_url=False))}") from None


# --- pydantic's errors as one line -------------------------------------------------------------------------

_RANGE_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "string_pattern_mismatch",
    "value_error",  # a validator's check, such as data.channels or train.nesterov
}
# A validator's ValueError starting with this adds its text to the line: "...; did you mean 'timm:resnet18'?"
HINT = "hint: "
PREFIX_TIMM = "timm:"
_TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}


def _describe(errors: list[ErrorDetails]) -> str:
    # A renamed key is both unknown and missing: the unknown one is the cause, and its suggestion the fix.
    first = min(errors, key=lambda error: error["type"] != "extra_forbidden")
    loc, value = first["loc"], first["input"]
    if first["type"] == "extra_forbidden":
        return _unknown_key(loc)
    key, field = _locate(loc)
    if first["type"] == "missing":
        return f"missing {'section' if len(loc) == 1 else 'key'} '{key}'"
    if first["type"] == "model_type":
        return f"{key or 'the top level'} must be a mapping of keys to values, got {value!r}"
    if first["type"] == "list_type":
        return f"{key} = {value!r} must be a list"
    # A union (`int | 'auto'`) reports one error per alternative, all for the same key: judge them together,
    # so the line never lists pydantic's alternatives one by one.
    kinds = {error["type"] for error in errors if _locate(error["loc"])[0] == key}
    allowed = field.description if field and field.description else first["msg"]
    if kinds & _RANGE_ERRORS:
        hint = first["msg"].partition(HINT)[2] if first["type"] == "value_error" else ""
        return f"{key} = {value!r} is out of range; allowed: {allowed}{f'; {hint}' if hint else ''}"
    if kinds == {"literal_error"}:
        return _not_allowed(key, value, field)
    expected = _TYPE_NAMES.get(first["type"], allowed) if len(kinds) == 1 else allowed
    return f"{key} = {value!r} must be {expected}, not {type(value).__name__}{_exponent_tip(value, kinds)}"


def _locate(loc: tuple[int | str, ...]) -> tuple[str, FieldInfo | None]:
    """The key an error location names (`train.lr`, `fetch.local_dirs[0]`) and its field. The tags pydantic adds
    for a union's alternatives ('constrained-int', "literal['auto']") are not fields: they end the walk."""
    key, field, model = "", None, Params
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif model is not None and part in model.model_fields:
            field = model.model_fields[part]
            key = f"{key}.{part}" if key else part
            model = _section_model(field)
        else:
            break
    return key, field


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    *parents, name = loc
    model = _section_model(Params.model_fields[str(parents[0])]) if parents else Params
    prefix = "".join(f"{parent}." for parent in parents)
    known = list(model.model_fields) if model else []
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return f"unknown key '{prefix}{name}'; {hint}"


def _not_allowed(key: str, value: Any, field: FieldInfo | None) -> str:
    allowed = [str(choice) for choice in typing.get_args(field.annotation if field else None)]
    close = difflib.get_close_matches(str(value), allowed, n=1)
    suggestion = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{key} = {value!r} is not allowed; use one of {', '.join(allowed)}{suggestion}"


def _exponent_tip(value: Any, kinds: set[str]) -> str:
    # PyYAML (YAML 1.1) reads 1e-3 as text: only 1.0e-3 or 0.001 are numbers.
    if "float_type" not in kinds or not isinstance(value, str) or not _is_number(value):
        return ""
    number = yaml.safe_dump(float(value)).splitlines()[0]
    return f"; write it as {number} (quotes, or an exponent without a dot like 1e-3, make YAML read text)"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
