"""Models from timm (`train.model: timm:<architecture>`): the name check, where pretrained weights come from,
and the input size and normalisation those weights expect.

Every source `train.pretrained` can name ends as one local file whose sha256 is printed and logged, and timm
itself loads it (`pretrained_cfg_overlay={"file": ...}`): timm adapts the first convolution to grey images
(`in_chans`), drops the ImageNet classifier for the data set's classes and applies the architecture's own key
filter, exactly as `timm.create_model(pretrained=True)` would. Loading never unpickles code: timm reads
`.safetensors` with safetensors and everything else with `torch.load(weights_only=True)`. A file in another
project's names (EfficientNet-PyTorch's: weight_layouts.py) is recognised by its keys and converted by name rules
in memory; timm then loads the converted tensors the same way, and the hash logged stays the file's own.

Downloads go where timm would send them (the Hugging Face Hub first, else the URL through torch.hub), into one
cache folder (paths.pretrained_cache) that can be copied to a machine without internet.
"""

import dataclasses
import difflib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from image_classifier import paths, weight_layouts
from image_classifier.errors import UserError, load_failure, one_line
from image_classifier.files import file_digest

PREFIX = "timm:"
# timm's local-dir layout and the Hub's: weights under these names (first found wins, as in timm), and a config.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
# When the architecture has no pretrained config at all (rare), it is built for this input size.
FALLBACK_INPUT_SIZE = 224


@dataclass(frozen=True)
class Weights:
    """Pretrained weights resolved to a file: what was asked for, what it resolved to, and the file's hash."""

    source: str  # as resolved: "hf-hub:timm/resnet18.a1_in1k", a URL, or a local path
    file: Path
    sha256: str
    config: dict[str, Any] = field(default_factory=dict)  # pretrained config shipped with them (mean, std...)
    layout: str = weight_layouts.TIMM  # whose names the file's tensors are in (weight_layouts.py)

    def line(self) -> str:
        where = "" if self.source == str(self.file) else f" ({self.file})"
        names = "" if self.layout == weight_layouts.TIMM else f", {self.layout} names converted to timm's"
        return f"pretrained weights: {self.source}{where}, sha256 {self.sha256}{names}"


def is_timm(model: str) -> bool:
    return model.startswith(PREFIX)


def architecture(model: str) -> str:
    """`timm:resnet18` -> `resnet18` (a tag such as `resnet18.a1_in1k` picks one of its published weights)."""
    return model.removeprefix(PREFIX)


def check_architecture(model: str) -> None:
    """Raise a UserError naming the closest architectures when timm does not know `model`'s."""
    import timm

    name = architecture(model)
    if timm.is_model(name):
        return
    known = timm.list_models() + timm.list_pretrained()
    closest = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(closest)}" if closest else "; timm.list_models() lists them"
    raise UserError(f"train.model = {model!r}: timm has no architecture {name!r}{hint}")


def default_config(model: str) -> dict[str, Any]:
    """The architecture's pretrained config (input size, mean, std, first conv, classifier), or {}."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(architecture(model))
    return cfg.to_dict() if cfg is not None else {}


def input_size(model: str) -> int:
    """The image side the architecture's published weights were trained at (224 for most)."""
    size = default_config(model).get("input_size")
    return size[-1] if size else FALLBACK_INPUT_SIZE


def model_kwargs(model: str, image_size: int) -> dict[str, Any]:
    """Extra arguments for timm.create_model: a ViT's position embedding is sized for one input size, so it is
    built for ours (timm resizes pretrained position embeddings to match when it loads them)."""
    return {"img_size": image_size} if default_config(model).get("fixed_input_size") else {}


def normalisation(model: str, weights: Weights, channels: int) -> tuple[list[float], list[float]]:
    """The mean and std the pretrained weights were trained with, for `channels` input channels (a grey image's
    one channel gets the average: timm's in_chans adaptation sums the first convolution over RGB)."""
    cfg = {**default_config(model), **weights.config}
    mean, std = list(cfg.get("mean", (0.5, 0.5, 0.5))), list(cfg.get("std", (0.5, 0.5, 0.5)))
    if channels == 1:
        return [sum(mean) / len(mean)], [sum(std) / len(std)]
    return mean, std


def create(
    model: str, num_classes: int, in_chans: int, kwargs: dict[str, Any], weights: Weights | None = None
) -> nn.Module:
    """A timm network for the data set's classes and channels, with `weights` loaded through timm if given."""
    import timm

    name = architecture(model)
    if weights is None:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    # Loaded with the file's own classifier, so timm loads strictly (with another class count it drops the
    # classifier and loads whatever names match, silently); then the classifier is replaced for our classes.
    # `source` and the Hub id are cleared so timm reads the file rather than where it would download from; a
    # file in another layout is handed to timm converted, as a state dict (timm's highest-priority source).
    converted = converted_state(weights, model, kwargs)
    shapes = {key: tuple(value.shape) for key, value in converted.items()} if converted else None
    file_classes = _classifier_rows(weights, model, shapes)
    overlay = {
        **weights.config,
        "file": str(weights.file),
        "state_dict": converted,
        "source": "",
        "hf_hub_id": None,
        "url": None,
        "num_classes": file_classes,
    }
    try:
        network = timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            num_classes=file_classes,
            in_chans=in_chans,
            **kwargs,
        )
    except RuntimeError as error:
        raise UserError(f"train.pretrained: {weights.file} does not fit {model}: {mismatch(error)}") from None
    network.reset_classifier(num_classes)
    return network


def converted_state(weights: Weights, model: str, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The file's tensors in timm's names when it is in another layout (None when it is in timm's): converted
    against the architecture built with the file's own class count and 3 input channels, as published."""
    import timm

    if weights.layout == weight_layouts.TIMM:
        return None
    state = read_state(weights.file)
    classes = state["_fc.weight"].shape[0] if "_fc.weight" in state else 0
    network = timm.create_model(architecture(model), pretrained=False, num_classes=classes, **kwargs)
    return weight_layouts.to_timm(state, network, f"train.pretrained: {weights.file}")


def _classifier_rows(weights: Weights, model: str, shapes: dict[str, tuple[int, ...]] | None = None) -> int:
    """How many classes the file's classifier has (0 for a file without one: a bare backbone)."""
    classifier = default_config(model).get("classifier") or "head"
    classifier = classifier if isinstance(classifier, str) else classifier[0]
    shapes = shapes or weight_shapes(weights.file)
    shape = shapes.get(f"{classifier}.weight") or shapes.get(f"module.{classifier}.weight")
    return shape[0] if shape else 0


def weight_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a weights file, read without running code (a safetensors header, or read_state)."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), "pt") as opened:
                return {key: tuple(opened.get_slice(key).get_shape()) for key in opened.keys()}  # noqa: SIM118
        except Exception as error:  # not safetensors, truncated
            raise UserError(f"train.pretrained: {file} cannot be loaded: {load_failure(error)}") from None
    return {key: tuple(value.shape) for key, value in read_state(file).items() if hasattr(value, "shape")}


def read_state(file: Path) -> dict[str, Any]:
    """A weights file's tensors, read without running code: safetensors, or `torch.load(weights_only=True)`
    (memory-mapped) unwrapped as timm unwraps training checkpoints."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        import torch

        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # torch.save's legacy format (the EfficientNet-PyTorch files) cannot be memory-mapped: read it whole.
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # not safetensors, refused pickle, truncated
        raise UserError(f"train.pretrained: {file} cannot be loaded: {load_failure(error)}") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise UserError(
            f"train.pretrained: {file} holds a {type(state).__name__}, not a state dict of tensors"
        )
    return state


def mismatch(error: RuntimeError) -> str:
    """PyTorch's many-line load_state_dict error as one line: what was missing, unexpected or of another shape."""
    text = str(error)
    parts = []
    for label, pattern in (
        ("missing", r"Missing key\(s\) in state_dict: (.*?)\.\s*$"),
        ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$"),
    ):
        found = re.search(pattern, text, re.MULTILINE)
        if found:
            keys = [key.strip().strip('"') for key in found[1].split(",")]
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{label} {', '.join(keys[:3])}{more}")
    sizes = re.findall(
        r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from "
        r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)",
        text,
    )
    for key, theirs, ours in sizes[:3]:
        parts.append(f"{key} is {theirs} in the file, {ours} in the model")
    if len(sizes) > 3:
        parts.append(f"{len(sizes) - 3} more of another shape")
    return "; ".join(parts) or " ".join(text.split())[:200]


# --- Where weights come from ---------------------------------------------------------------------------------


def resolve_weights(pretrained: str, model: str) -> Weights | None:
    """`train.pretrained` as a local file (downloading it first if need be), or None for random weights; its
    layout (whose names its tensors are in) read from its keys."""
    if not pretrained:
        return None
    weights = _resolve(pretrained, model)
    layout = weight_layouts.detect(list(weight_shapes(weights.file)))
    return dataclasses.replace(weights, layout=layout)


def _resolve(pretrained: str, model: str) -> Weights:
    if pretrained == "default":
        return _published(model)
    if pretrained.startswith("hf-hub:"):
        return _from_hub(pretrained.removeprefix("hf-hub:"))
    if re.match(r"https?://", pretrained):
        return _from_url(pretrained)
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return _from_local_dir(path, model)
    if path.is_file():
        return Weights(str(path), path, file_digest(path))
    raise UserError(f"train.pretrained = {pretrained!r}: no such file or folder")


def _published(model: str) -> Weights:
    cfg = default_config(model)
    if cfg.get("hf_hub_id"):
        return _from_hub(cfg["hf_hub_id"], cfg.get("hf_hub_filename"), cfg)
    if cfg.get("url"):
        return _from_url(cfg["url"], cfg)
    raise UserError(f"train.pretrained = 'default': timm publishes no weights for {architecture(model)!r}")


def _from_hub(repo_id: str, filename: str | None = None, cfg: dict[str, Any] | None = None) -> Weights:
    """Weights from the Hugging Face Hub, or from the cache alone when offline (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    cache = paths.pretrained_cache() / "huggingface"
    file, offline = None, False
    for name in [filename] if filename else WEIGHT_FILES:
        if offline:  # the Hub did not answer (it retries for half a minute): only the cache can help now
            cached = try_to_load_from_cache(repo_id, name, cache_dir=cache)
            file = Path(cached) if isinstance(cached, str) else None
            if file:
                break
            continue
        try:
            file = Path(hf_hub_download(repo_id, name, cache_dir=cache))
            break
        except RemoteEntryNotFoundError:
            continue
        except LocalEntryNotFoundError:  # offline, and not in the cache: another name may be
            offline = True
        except RepositoryNotFoundError:
            raise UserError(f"train.pretrained: the Hub has no repository {repo_id!r}") from None
    if file is None and offline:
        raise UserError(
            f"train.pretrained: hf-hub:{repo_id} is not in the cache {cache} and the Hub cannot be reached; "
            f"on a machine with internet run `make pretrained ARCH=...` and copy {paths.pretrained_cache()}"
        )
    if file is None:
        raise UserError(f"train.pretrained: hf-hub:{repo_id} holds none of {', '.join(WEIGHT_FILES)}")
    config = cfg or _hub_config(repo_id, cache)
    return Weights(f"hf-hub:{repo_id}", file, file_digest(file), _input_config(config))


def _hub_config(repo_id: str, cache: Path) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        return _read_config(Path(hf_hub_download(repo_id, CONFIG_FILE, cache_dir=cache)))
    except Exception:  # a weights-only repository: the architecture's own config applies
        return {}


def _from_url(url: str, cfg: dict[str, Any] | None = None) -> Weights:
    """A download through torch.hub into the cache. A hex string after the last '-' of the file name
    (torch.hub's convention, `resnet18-d63eafa0.pth`) must begin the file's sha256: checked on download and
    again on every use, so a corrupted cached copy is refused too."""
    import urllib.error
    from urllib.parse import urlparse

    import torch.hub

    folder = paths.pretrained_cache() / "torch"
    file = folder / Path(urlparse(url).path).name
    expected = _hash_prefix(file.name)
    if not file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"downloading {url} to {file}", file=sys.stderr)
        try:
            torch.hub.download_url_to_file(url, str(file), hash_prefix=expected, progress=True)
        except RuntimeError as error:  # torch.hub's hash check; the partial download is already deleted
            raise UserError(f"train.pretrained: {url} is corrupted: {one_line(error, limit=None)}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", None) or error
            status = f"HTTP {error.code} " if isinstance(error, urllib.error.HTTPError) else ""
            raise UserError(f"train.pretrained: cannot download {url}: {status}{reason}") from None
    digest = file_digest(file)
    if expected and not digest.startswith(expected):
        raise UserError(
            f"train.pretrained: {file} is corrupted: its sha256 {digest[:12]}... does not begin with {expected} "
            "as its name says; delete it to download it again"
        )
    return Weights(url, file, digest, _input_config(cfg or {}))


def _hash_prefix(name: str) -> str | None:
    found = re.search(r"-([a-f0-9]{8,64})\.", name)  # torch.hub.HASH_REGEX, at least 8 digits
    return found[1] if found else None


def _from_local_dir(folder: Path, model: str) -> Weights:
    """timm's `local-dir:` layout: config.json (architecture, pretrained_cfg) beside model.safetensors."""
    file = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if file is None:
        raise UserError(f"train.pretrained: {folder} holds none of {', '.join(WEIGHT_FILES)}")
    config = _read_config(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    theirs = config.get("architecture")
    if theirs and theirs.split(".")[0] != architecture(model).split(".")[0]:
        raise UserError(
            f"train.pretrained: {folder} holds weights for {theirs!r}, not {architecture(model)!r}"
        )
    return Weights(str(folder), file, file_digest(file), _input_config(config))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"train.pretrained: {path} is not a readable JSON config ({error})") from None
    return config if isinstance(config, dict) else {}


def _input_config(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a pretrained config that describe the input; the rest (classifier, num_classes) stays timm's."""
    cfg = config.get("pretrained_cfg", config)
    return {key: cfg[key] for key in ("mean", "std", "input_size") if key in cfg}
