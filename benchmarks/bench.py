"""Speed benchmark: our train path against the PyTorch quickstart as its tutorial writes it.

    make bench                      # or: python benchmarks/bench.py [--skip-tutorial] [--rounds 3]
    python benchmarks/bench.py --data-scale    # opt-in: data bigger than memory (benchmarks/data_scale.py)
    python benchmarks/bench.py --gpu --data data/raw [--out table.md]   # the GPU table (docs/scaling.md, On a GPU)

Prints a markdown table. Every measurement runs in a fresh child process (same start-up for each, and the
child's peak memory is read from the OS; the GPU mode runs in one process, see its section below); run it on an
otherwise idle machine: other load distorts timings.
The tutorial and the recipe rows it is compared with run in interleaved rounds and report the median round, so
a machine that speeds up or slows down during the run moves both sides of the ratio alike.
Needs the fetched data (data/raw, from `dvc repro fetch`) and, for the no-op repro row, a finished `dvc repro`.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import data_scale
import small_sets
from common import (
    QUICKSTART_RECIPE,
    ValidationProbe,
    preprocess_fashion_mnist,
    quickstart_model,
    quickstart_tutorial,
    run_child,
    table_header,
    table_row,
    train_flags,
)
from repository import REPO, command_timer, copy_repository, init_repository

THRESHOLDS = (0.90, 0.91, 0.92)


def our_train(
    overrides: dict, device_name: str, val_size: int, probe: bool = False, normalise: bool = True
) -> dict:
    """Our train loop (the train stage's library call) with `overrides` on params.yaml; per-epoch history,
    with `probe` validation accuracy every few steps, without `normalise` raw 0..1 inputs as the tutorial's."""
    import torch
    import yaml

    from image_classifier import params as params_module
    from image_classifier.data import channel_stats, stratified_indices
    from image_classifier.datasets import get_dataset
    from image_classifier.device import configure_host
    from image_classifier.models import model_config, predict_logits
    from image_classifier.raw_formats import decode_idx
    from image_classifier.train import train

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(overrides, device=device_name)
    params = params_module.from_dict(raw)
    configure_host(params.train.threads)
    spec = get_dataset(params.data.dataset)
    splits = decode_idx(REPO / "data/raw", spec)
    rest, val_index = stratified_indices(splits["train"].labels, val_size, seed=0)
    train_split, val_split = splits["train"].subset(rest), splits["train"].subset(val_index)
    mean, std = channel_stats(train_split.images)
    config, _ = model_config(
        params.train,
        spec.name,
        list(spec.image_shape),
        list(spec.classes),
        mean if normalise else [0.0],
        std if normalise else [1.0],
    )
    device = torch.device(device_name)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        probe_hook = ValidationProbe(val_split.images, val_split.labels, device) if probe else None
        result = train(
            params.train,
            config,
            train_split,
            val_split,
            device,
            Path(scratch) / "resume.pt",
            on_step=probe_hook,
        )
        seconds = probe_hook.training_seconds() if probe_hook else time.perf_counter() - started
    from image_classifier.models import build_model

    model = build_model(config).to(device)
    model.load_state_dict(result.best_state)
    test = splits["test"]
    logits = predict_logits(model, test.images.to(device), 1000)
    accuracy = (logits.argmax(1).cpu() == test.labels).float().mean().item()
    return {
        "seconds": seconds,
        "test_accuracy": accuracy,
        "history": result.history,
        "compile_seconds": result.compile_seconds,
        "probes": probe_hook.points if probe_hook else [],
        "steps_per_epoch": result.plan.steps_per_epoch,
    }


def bare_recipe(device_name: str) -> dict:
    """The tutorial's arithmetic alone: its model, loss, optimiser, batch and epochs over batches sliced from one
    float tensor, in the tutorial's order, with nothing else in the loop (no augmentation, no bookkeeping, no
    test pass). No loop that trains this recipe can be faster: it bounds the recipe rows' ratio."""
    import torch

    from image_classifier.datasets import get_dataset
    from image_classifier.raw_formats import decode_idx

    splits = decode_idx(REPO / "data/raw", get_dataset("fashion-mnist"))
    device = torch.device(device_name)
    images = splits["train"].images.to(device).float().div_(255)
    labels = splits["train"].labels.to(device)
    model, loss_fn, optimizer = quickstart_model(device)
    started = time.perf_counter()
    for _ in range(5):
        for start in range(0, len(labels), 64):
            loss = loss_fn(model(images[start : start + 64]), labels[start : start + 64])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        test = splits["test"]
        predicted = model(test.images.to(device).float().div_(255)).argmax(1).cpu()
    return {"seconds": seconds, "test_accuracy": (predicted == test.labels).float().mean().item()}


def preprocess_all() -> dict:
    """The preprocess stage's library call on all 70,000 images, without interpreter start-up."""
    with tempfile.TemporaryDirectory() as out:
        return {"seconds": preprocess_fashion_mnist(Path(out))}


STAGE_NAMES = ("fetch", "preprocess", "train", "evaluate", "export")

_STORE = "import mlflow, mlflow.store.tracking.sqlalchemy_store"  # MLflow and its SQL store (the default)
_FIGURES = "import matplotlib.pyplot"
# What each stage's process cannot do without, on a trivial model: the libraries it imports and their first-use
# costs (every torch.optim optimiser imports torch's compiler front end; ONNX builds its operator registry). No
# change of ours can take a stage's process below this, whatever the data.
STAGE_FLOORS = {
    "fetch": ["import yaml, pydantic"],
    "preprocess": ["import torch, PIL.Image", _FIGURES],
    "train": ["import torch", "torch.optim.SGD([torch.zeros(1, requires_grad=True)])", _STORE, _FIGURES],
    "evaluate": ["import torch", _STORE, _FIGURES],
    "export": [
        "import torch, onnxruntime, mlflow.pytorch",
        "torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(2, 2),), dynamo=True, verbose=False)",
        _STORE,
    ],
}


def stage_floors(repeats: int = 3) -> dict[str, float]:
    """Each stage's floor (STAGE_FLOORS) in a fresh interpreter that exits as a stage does (the collector
    frozen), best of `repeats`."""
    programs = {name: "\n".join([*lines, "import gc", "gc.freeze()"]) for name, lines in STAGE_FLOORS.items()}
    command = command_timer(REPO)
    return {
        name: min(command(sys.executable, "-c", program) for _ in range(repeats))
        for name, program in programs.items()
    }


def small_folder_pipeline(device_name: str, count: int = 200) -> dict:
    """`dvc repro` with the defaults on a folder of `count` real photos-as-PNGs (Fashion-MNIST test images), in a
    fresh copy of the repository: the whole wall time against the training time it contains, then each stage's
    process alone (start-up included) on the same data."""
    with tempfile.TemporaryDirectory() as scratch:
        repo = copy_repository(Path(scratch) / "repo")
        command = command_timer(repo)

        init_repository(command)
        sources = ["--source", str(REPO / "data/raw"), "--source", "/usr/share/datasets/fashion-mnist"]
        command(sys.executable, "scripts/make_example_folder.py", "--count", str(count), *sources)
        params = (repo / "params.yaml").read_text()
        params = params.replace("  dataset: fashion-mnist ", "  dataset: folder        ", 1)
        (repo / "params.yaml").write_text(params.replace("  device: auto ", f"  device: {device_name:<5}", 1))
        wall = command("dvc", "repro")
        train = json.loads((repo / "reports/train/metrics.json").read_text())
        test = json.loads((repo / "reports/evaluate/metrics.json").read_text())
        again = command("dvc", "repro", "--force")  # as a user iterating meets it: the MLflow store exists
        again_train = json.loads((repo / "reports/train/metrics.json").read_text())["train_seconds"]
        stages = {name: command(sys.executable, f"stages/{name}.py") for name in STAGE_NAMES}
    return {
        "stage_floor_seconds": stage_floors(),
        "seconds": wall,
        "train_seconds": train["train_seconds"],
        "again_seconds": again,
        "again_train_seconds": again_train,
        "epochs": train["epochs_trained"],
        "test_accuracy": test["accuracy"],
        "stage_seconds": stages,
    }


SHORT = {"epochs": 7}

MEASUREMENTS = {
    "tutorial": lambda device: quickstart_tutorial(device),
    "recipe": lambda device: our_train({**QUICKSTART_RECIPE, "precision": "fp32"}, device, val_size=0),
    "recipe-bf16": lambda device: our_train({**QUICKSTART_RECIPE, "precision": "bf16"}, device, val_size=0),
    # The tutorial feeds raw 0..1 pixels; our model normalises them, which alone lifts accuracy.
    "recipe-raw": lambda device: our_train(
        {**QUICKSTART_RECIPE, "precision": "fp32"}, device, val_size=0, normalise=False
    ),
    "recipe-floor": lambda device: bare_recipe(device),
    "default": lambda device: our_train({}, device, val_size=5000, probe=True),
    # A shorter one-cycle schedule (7 epochs instead of 12): what a tighter time budget buys.
    "short": lambda device: our_train(SHORT, device, val_size=5000),
    "short-compiled": lambda device: our_train({**SHORT, "compile": "default"}, device, val_size=5000),
    "preprocess": lambda device: preprocess_all(),
    "small-folder": lambda device: small_folder_pipeline(device),
    **data_scale.MEASUREMENTS,
    **small_sets.MEASUREMENTS,
}

Row = tuple[str, ...]


def measure(name: str, device: str) -> dict:
    """Run one measurement in a child process; add that child's peak resident memory."""
    result, peak_rss_mb = run_child([sys.executable, __file__, "--child", name, "--device", device], name)
    result["peak_rss_mb"] = peak_rss_mb
    return result


def median_round(rounds: list[dict[str, dict]], name: str) -> dict:
    """The round of `name` with the median time (the lower middle one for an even count), with every round's
    time kept in "round_seconds" to show the spread."""
    ordered = sorted((round_[name] for round_ in rounds), key=lambda result: result["seconds"])
    return {
        **ordered[(len(ordered) - 1) // 2],
        "round_seconds": [round_[name]["seconds"] for round_ in rounds],
    }


def first_reaching(result: dict, threshold: float) -> str:
    for seconds, step, accuracy in result["probes"]:
        if accuracy >= threshold:
            return f"{seconds:.1f} s (epoch {step / result['steps_per_epoch']:.2f})"
    return "not reached"


def vs_tutorial(tutorial: dict | None, seconds: float) -> str:
    if not tutorial:
        return "n/a"
    ratio = tutorial["seconds"] / seconds
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


def vs_tutorial_by_round(tutorial: dict | None, result: dict) -> str:
    """The ratio of the medians, and the range of the ratios within each round."""
    if not tutorial:
        return "n/a"
    ratios = [t / r for t, r in zip(tutorial["round_seconds"], result["round_seconds"], strict=True)]
    detail = f" (rounds {min(ratios):.1f}-{max(ratios):.1f}x)" if len(ratios) > 1 else ""
    return vs_tutorial(tutorial, result["seconds"]) + detail


def spread(result: dict) -> str:
    times = result["round_seconds"]
    return f" (rounds: {', '.join(f'{t:.1f}' for t in times)})" if len(times) > 1 else ""


def recipe_rows(device: str, skip_tutorial: bool, rounds: int) -> tuple[dict | None, list[Row]]:
    """The tutorial and the same recipe through our train loop, in interleaved rounds (median round shown), then
    in bf16 and as its bare arithmetic; returns the tutorial's result too, the yardstick of later rows."""
    compared = ("recipe", "recipe-raw") if skip_tutorial else ("tutorial", "recipe", "recipe-raw")
    results = [{name: measure(name, device) for name in compared} for _ in range(max(1, rounds))]
    tutorial = None if skip_tutorial else median_round(results, "tutorial")
    recipe, recipe_raw = median_round(results, "recipe"), median_round(results, "recipe-raw")
    recipe_bf16 = measure("recipe-bf16", device)
    floor = measure("recipe-floor", device)
    rows = []
    if tutorial:
        rows.append(
            (
                "Quickstart tutorial as written (DataLoader, MLP, SGD 1e-3, batch 64, 5 epochs)",
                f"{tutorial['seconds']:.1f} s{spread(tutorial)}",
                f"{tutorial['test_accuracy']:.4f}",
                "1.0x",
            )
        )
    for label, result in (
        ("fp32, raw 0..1 inputs as the tutorial's", recipe_raw),
        ("fp32, our normalised inputs", recipe),
    ):
        rows.append(
            (
                f"Same recipe through our train loop ({label})",
                f"{result['seconds']:.1f} s{spread(result)}",
                f"{result['test_accuracy']:.4f}",
                vs_tutorial_by_round(tutorial, result),
            )
        )
    rows.append(
        (
            "Same recipe through our train loop (bf16 autocast, normalised inputs; one round)",
            f"{recipe_bf16['seconds']:.1f} s",
            f"{recipe_bf16['test_accuracy']:.4f}",
            vs_tutorial(tutorial, recipe_bf16["seconds"]),
        )
    )
    rows.append(
        (
            "Same recipe, its arithmetic alone (model, loss, SGD over sliced batches; nothing else; one round): "
            "the fastest any loop can train it",
            f"{floor['seconds']:.1f} s",
            f"{floor['test_accuracy']:.4f}",
            vs_tutorial(tutorial, floor["seconds"]),
        )
    )
    return tutorial, rows


def default_config_rows(device: str, tutorial: dict | None) -> tuple[dict, list[Row]]:
    """The default config: time to the tutorial's accuracy and to each threshold, all its epochs; then the short
    schedule, plain and compiled. Returns the default run's result too (its peak memory is a later row)."""
    default = measure("default", device)
    short = measure("short", device)
    short_compiled = measure("short-compiled", device)
    target = tutorial["test_accuracy"] if tutorial else 0.65
    reached = first_reaching(default, target)
    rows = [
        (
            f"Default config: to the tutorial's accuracy ({target:.4f}) on validation",
            reached,
            "",
            vs_tutorial(tutorial, float(reached.split()[0])) if reached != "not reached" else "",
        )
    ]
    for threshold in THRESHOLDS:
        rows.append(
            (
                f"Default config: to {threshold:.0%} validation accuracy",
                first_reaching(default, threshold),
                "",
                "",
            )
        )
    rows.append(
        (
            f"Default config: all {len(default['history'])} epochs, test accuracy",
            f"{default['seconds']:.1f} s",
            f"{default['test_accuracy']:.4f}",
            "",
        )
    )
    rows.append(
        (
            f"Short schedule (`{train_flags(SHORT)}`): training time, test accuracy",
            f"{short['seconds']:.1f} s",
            f"{short['test_accuracy']:.4f}",
            "",
        )
    )
    rows.append(
        (
            "Same short schedule with `-S train.compile=default`: training time (compile time apart)",
            f"{short_compiled['seconds'] - short_compiled['compile_seconds']:.1f} s "
            f"(+ {short_compiled['compile_seconds']:.1f} s compile)",
            f"{short_compiled['test_accuracy']:.4f}",
            "",
        )
    )
    return default, rows


def preprocess_and_repro_rows(device: str) -> list[Row]:
    """Preprocess as a library call and as a whole process, and a `dvc repro` with nothing to do."""
    preprocess = measure("preprocess", device)
    # The interpreter's own folder first on PATH, as `make` puts it: the dvc that runs is this environment's.
    command = command_timer(REPO)
    rows = [
        (
            "Preprocess all 70,000 images (library call, no start-up)",
            f"{preprocess['seconds']:.2f} s",
            "",
            "",
        ),
        (
            "Preprocess stage, whole process (`python stages/preprocess.py`)",
            f"{command(sys.executable, 'stages/preprocess.py'):.1f} s",
            "",
            "",
        ),
    ]
    if (REPO / "dvc.lock").is_file():
        command("dvc", "repro")  # brings the workspace up to date if it was not
        rows.append(("No-op `dvc repro`", f"{command('dvc', 'repro'):.2f} s", "", ""))
    return rows


def small_folder_rows(device: str) -> list[Row]:
    folder = measure("small-folder", device)
    overhead = folder["seconds"] - folder["train_seconds"]
    again_overhead = folder["again_seconds"] - folder["again_train_seconds"]
    return [
        (
            "200-image folder, defaults: whole `dvc repro` (of which training; overhead, target <= 10 s)",
            f"{folder['seconds']:.1f} s ({folder['train_seconds']:.1f} s, {folder['epochs']} epochs; "
            f"overhead {overhead:.1f} s)",
            f"{folder['test_accuracy']:.4f}",
            "",
        ),
        (
            "200-image folder again, `dvc repro --force` (the MLflow store made; of which training; overhead)",
            f"{folder['again_seconds']:.1f} s ({folder['again_train_seconds']:.1f} s; overhead {again_overhead:.1f} s)",
            "",
            "",
        ),
        (
            "200-image folder: each stage's process alone, start-up included",
            ", ".join(f"{name} {seconds:.1f} s" for name, seconds in folder["stage_seconds"].items()),
            "",
            "",
        ),
        (
            "Each stage's floor: the libraries it loads and their first use, on a trivial model "
            "(`bench.STAGE_FLOORS`, fresh interpreter, best of 3)",
            ", ".join(f"{name} {seconds:.1f} s" for name, seconds in folder["stage_floor_seconds"].items())
            + f"; {sum(folder['stage_floor_seconds'].values()):.1f} s in all",
            "",
            "",
        ),
    ]


def speed_table(device: str, skip_tutorial: bool, rounds: int) -> list[Row]:
    """The default table (`make bench`), its measurements in this order."""
    tutorial, rows = recipe_rows(device, skip_tutorial, rounds)
    default, default_rows = default_config_rows(device, tutorial)
    rows += default_rows
    rows += preprocess_and_repro_rows(device)
    rows.append(("Peak memory of the default training process", f"{default['peak_rss_mb']:.0f} MB", "", ""))
    rows += small_folder_rows(device)
    return rows + small_sets.rows(measure, device, tutorial)


def small_sets_table(device: str, skip_tutorial: bool) -> list[Row]:
    """`--small-sets`: the small-folder rows, with the tutorial for the ratio."""
    tutorial = None if skip_tutorial else measure("tutorial", device)
    rows = (
        [("Quickstart tutorial as written", f"{tutorial['seconds']:.1f} s", "", "1.0x")] if tutorial else []
    )
    return rows + small_sets.rows(measure, device, tutorial)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--skip-tutorial", action="store_true", help="skip the slow tutorial row")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of the tutorial and fp32 recipe rows (default 3)"
    )
    parser.add_argument("--data-scale", action="store_true", help="only the data-bigger-than-memory rows")
    parser.add_argument(
        "--small-sets",
        action="store_true",
        help="only the small-folder rows (with the tutorial, for the ratio)",
    )
    parser.add_argument("--scale-images", type=int, default=50_000, help="JPEGs to generate (--data-scale)")
    parser.add_argument(
        "--scale-dir", default="/var/tmp/bench-scale", help="where --data-scale keeps its folder and shards"
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the GPU table, in one process, on a bare machine with torch (docs/scaling.md, On a GPU); --device cpu "
        "runs its code path on a subset",
    )
    parser.add_argument("--data", default=str(REPO / "data/raw"), help="--gpu: the four IDX files' folder")
    parser.add_argument(
        "--limit",
        type=int,
        default=0,
        help="--gpu: train and test on a stratified N images of each split, every row cut short (--device cpu: "
        "1,000 unless given)",
    )
    parser.add_argument("--out", help="--gpu: also write the table to this file, row by row")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.gpu:
        import bench_gpu  # here: only the GPU mode needs it

        bench_gpu.main(args)
        return
    os.environ.setdefault("BENCH_SCALE_DIR", args.scale_dir)  # the children read it
    if args.child:
        print(json.dumps(MEASUREMENTS[args.child](args.device)))
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not (REPO / "data/raw").is_dir():
        raise SystemExit("data/raw is missing: run `dvc repro fetch` (or `make repro`) first")
    if args.data_scale:
        Path(args.scale_dir).mkdir(parents=True, exist_ok=True)
        print_table(device, data_scale.rows(measure, device, args.scale_images), compared="Compared")
    elif args.small_sets:
        print_table(device, small_sets_table(device, args.skip_tutorial), compared="Compared")
    else:
        print_table(device, speed_table(device, args.skip_tutorial, args.rounds))


def print_table(device: str, rows: list[Row], compared: str = "vs tutorial") -> None:
    print("\n" + "\n".join(table_header(device, ("Measurement", "Time", "Test accuracy", compared))))
    for row in rows:
        print(table_row(row))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
