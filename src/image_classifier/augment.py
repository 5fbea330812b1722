"""Batched, per-image augmentation on the device: every image of a batch draws its own transform."""

import torch
import torch.nn.functional as F


def augment(images: torch.Tensor, crop_padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to `crop_padding` pixels (zero fill) and random horizontal flip, per image.

    Works on a whole uint8 batch at once with one gather, so it costs the same on a CPU or a GPU.
    """
    n, _, height, width = images.shape
    device = images.device
    if crop_padding:
        p = crop_padding
        padded = F.pad(images, (p, p, p, p))
        shifts = torch.randint(0, 2 * p + 1, (2, n, 1), device=device, generator=generator)
        rows = (torch.arange(height, device=device) + shifts[0])[:, None, :, None]
        cols = (torch.arange(width, device=device) + shifts[1])[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    if flip:
        flipped = torch.rand(n, device=device, generator=generator) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    return images
