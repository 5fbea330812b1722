"""Where a folder data set's images go: which split (by a hash of the path), and which shard (new images in new
shards), so that adding images to a folder leaves the stored shards of the others as they were.

- Split: within each class, images are ranked by sha1(seed, path); the first `quota` of a class are held out
  (test, then validation), quotas by largest remainder as for the built-in data sets. Held-out shares are so
  within one image of exact per class (and at least one image of every class that has two). Adding images to a
  class only moves the few images whose rank crosses the quota, on average fewer than one per 100 added at 10%.
- Shard: each split records its layout (`index.csv`: filename, label, shard, seed). The next preprocess keeps every
  earlier shard's images together in their earlier order (a shard is rewritten only when it lost an image) and
  puts new images into new shards after them. The earlier layout is the split's folder as the last run left it,
  or, when DVC removed the outputs before running the stage, the same file in DVC's cache, found through
  dvc.lock. Removing an image rewrites the one shard it was in (smaller); nothing else moves.
"""

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import yaml

INDEX_FILE = "index.csv"


def hash_rank_order(names: list[str], seed: int) -> np.ndarray:
    """Indices of `names` sorted by sha1 of "<seed>:<name>": a shuffle that depends on each name alone."""
    keys = [hashlib.sha1(f"{seed}:{name}".encode(), usedforsecurity=False).digest() for name in names]
    return np.array(sorted(range(len(names)), key=keys.__getitem__), dtype=np.int64)


def plan_shards(names: list[str], per_shard: int, previous: dict[str, int] | None) -> list[list[int]]:
    """Positions of `names` (one split, in manifest order) grouped into shards of at most `per_shard`: the
    earlier layout's shards first (each keeps its images still present, in its order), then the new images."""
    if previous and max(np.bincount(list(previous.values()))) > per_shard:
        previous = None  # laid out for bigger shards: start afresh
    previous = previous or {}
    where = {name: i for i, name in enumerate(names)}
    kept: dict[int, list[int]] = {}
    for name, shard in previous.items():  # in the earlier file's (stored) order
        if name in where:
            kept.setdefault(shard, []).append(where[name])
    shards = [kept[number] for number in sorted(kept)]
    new = [i for i, name in enumerate(names) if name not in previous]
    shards += [new[start : start + per_shard] for start in range(0, len(new), per_shard)]
    return shards or [[]]  # an empty split still gets one (empty) shard: it records the image shape


def write_index(path: Path, names: list[str], labels: list[str], shards: list[int], seed: int) -> None:
    """The split's layout: each stored image's file, label and shard, and the seed that drew the splits."""
    with Path(path).open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["filename", "label", "shard", "seed"])
        writer.writerows(
            (name, label, shard, seed) for name, label, shard in zip(names, labels, shards, strict=True)
        )


def previous_layout(split_dir: Path, seed: int) -> dict[str, int] | None:
    """filename → shard of the split the last preprocess stored in `split_dir` with the same `seed` (another seed
    draws the splits afresh), or None when there is none."""
    split_dir = Path(split_dir)
    if (split_dir / INDEX_FILE).is_file():
        text = (split_dir / INDEX_FILE).read_text(encoding="utf-8")
    else:
        text = _from_dvc_cache(split_dir)
    if text is None:
        return None
    try:
        rows = list(csv.DictReader(text.splitlines()))
        if any(int(row["seed"]) != seed for row in rows):
            return None
        return {row["filename"]: int(row["shard"]) for row in rows}
    except (KeyError, ValueError, TypeError):
        return None  # not a layout this version wrote: lay the split out afresh


def _from_dvc_cache(split_dir: Path) -> str | None:
    """`split_dir`/index.csv as dvc.lock's output that holds it recorded it, read from DVC's local cache."""
    root = Path(os.environ.get("DVC_ROOT", "."))
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text())
        relative = split_dir.resolve().relative_to(root.resolve())
        for stage in (lock or {}).get("stages", {}).values():
            for out in stage.get("outs", []):
                inside = relative.relative_to(out["path"]) if relative.is_relative_to(out["path"]) else None
                if inside is None or not str(out.get("md5", "")).endswith(".dir"):
                    continue
                listing = json.loads(_cached(root, out["md5"]).read_text())
                wanted = (inside / INDEX_FILE).as_posix()
                for entry in listing:
                    if entry["relpath"] == wanted:
                        return _cached(root, entry["md5"]).read_text(encoding="utf-8")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
        return None  # no lock, no cache, or not this layout: a fresh layout is always correct
    return None


def _cached(root: Path, md5: str) -> Path:
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
