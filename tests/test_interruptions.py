"""The fault suite, interruptions (issue 6): Ctrl-C, SIGTERM (issue 18) and SIGKILL during training, SIGKILL in the
middle of writing fetch, preprocess and export outputs, two `dvc repro` at once, and bad params under `dvc repro`;
on a real subset of Fashion-MNIST, through DVC, in a fresh copy of the repository.

Training resumes from its last checkpoint and, on the CPU with a fixed seed, ends with weights bit-identical to an
uninterrupted run; a killed writer never leaves a partial file under an output's name; `dvc repro` recovers.
"""

import hashlib
import json
import signal
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import FASHION_DIR, copy_repo, default_params, run, write_params
from fault_helpers import (
    held_epoch,
    history_without_timings,
    hold_env,
    kill_group,
    outputs_snapshot,
    register_case_count,
    run_command,
    signal_group,
    start_command,
    state_dict_hash,
    visible_lines,
    wait_for,
)

from image_classifier.data import load_split
from image_classifier.datasets import get_dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make setup)"),
]
HARNESS = Path(__file__).resolve().parent / "kill_during_write.py"
LOCK_MESSAGE = "is busy, it is being blocked by"


@pytest.fixture(scope="module", autouse=True)
def _count_cases(request: pytest.FixtureRequest) -> None:
    register_case_count(request.config)


def subset_params() -> dict:
    raw = default_params()
    raw["preprocess"].update(val_size=400, train_subset=6000)
    # Several epochs, fixed seed: resumable and bit-reproducible. The interrupted runs hold at a checkpoint until
    # the test signals them (tests/hold), so the epochs' length does not matter.
    raw["train"].update(model="cnn", width=8, epochs=8, batch_size=100, lr=0.05, device="cpu", seed=0)
    return raw


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A repository with fetched and preprocessed data, and the weights of an uninterrupted training run made
    outside DVC (so DVC's run cache cannot stand in for the interrupted runs later)."""
    repo = copy_repo(tmp_path_factory.mktemp("interruptions"))
    write_params(repo, subset_params())
    run(["dvc", "repro", "preprocess"], cwd=repo)
    run(["python", "stages/train.py"], cwd=repo)
    reference = {
        "repo": repo,
        "weights": state_dict_hash(repo / "models/model.pt"),
        "history": history_without_timings(repo / "reports/train/history.csv"),
    }
    assert not list((repo / "data/resume").glob("*.pt")), "a completed run removes its scratch checkpoint"
    return reference


def holds_dvc_lock(repo: Path, pid: int) -> bool:
    """Whether process `pid` holds DVC's write lock on a stage's outputs (it does while the stage runs)."""
    try:
        lock = json.loads((repo / ".dvc/tmp/rwlock").read_text())
    except (OSError, ValueError):
        return False
    return any(holder.get("pid") == pid for holder in lock.get("write", {}).values())


class Checkpoint:
    """The epoch of the resumable checkpoint in data/resume, read again only when the file changes."""

    def __init__(self, repo: Path) -> None:
        self.folder, self.seen, self.epoch = repo / "data/resume", None, 0

    def __call__(self) -> int:
        files = list(self.folder.glob("train-*.pt"))
        try:
            stamp = files[0].stat().st_mtime_ns if len(files) == 1 else None
            if stamp is None:
                return 0
            if stamp != self.seen:
                self.seen, self.epoch = stamp, torch.load(files[0], weights_only=True)["epoch"]
        except FileNotFoundError:  # removed by a run that just completed
            return 0
        return self.epoch


def test_interrupted_training_resumes_to_bit_identical_weights(pipeline: dict, tmp_path: Path) -> None:
    repo, checkpoint = pipeline["repo"], Checkpoint(pipeline["repo"])
    before = store_runs(repo)

    # Ctrl-C while the training holds after epoch 1's checkpoint: the stage stops with "interrupted", the
    # checkpoint stays, and the MLflow run ends KILLED (issue 18).
    marker = tmp_path / "held-1"
    job = start_command(["dvc", "repro", "train"], repo, hold_env(marker, "train-*.pt", epoch=1))
    try:
        wait_for(marker.exists, job, 300, "epoch 1's checkpoint")
        signal_group(job, signal.SIGINT)
        output = job.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        kill_group(job)
    assert job.returncode != 0 and "interrupted" in output, output[-2000:]
    interrupted = checkpoint()
    assert interrupted == held_epoch(marker) == 1
    (run_id,) = set(store_runs(repo)) - set(before)
    assert store_runs(repo)[run_id] == "KILLED" and run_tags(repo, run_id)["stage.train"] == "killed (Ctrl-C)"

    # SIGKILL of the whole job while it holds after one more epoch's checkpoint: nothing gets to clean up.
    marker = tmp_path / "held-2"
    job = start_command(["dvc", "repro", "train"], repo, hold_env(marker, "train-*.pt", interrupted + 1))
    try:
        wait_for(marker.exists, job, 300, "one more epoch's checkpoint")
        signal_group(job, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        kill_group(job)
    killed = checkpoint()
    assert killed == held_epoch(marker) == interrupted + 1 < 8, (interrupted, killed)
    assert store_runs(repo)[run_id] == "RUNNING", (
        "nothing runs at a SIGKILL: the resumed training continued the run"
    )
    model = repo / "models/model.pt"
    assert not model.exists() or state_dict_hash(model) == pipeline["weights"], "no partial model file"

    # `dvc repro` resumes after the last checkpoint. While it holds one epoch on, a second `dvc repro` is refused
    # by DVC's lock; then the test releases it (a training that ended first would let the second one in).
    marker = tmp_path / "held-3"
    job = start_command(["dvc", "repro", "train"], repo, hold_env(marker, "train-*.pt", killed + 1))
    try:
        wait_for(marker.exists, job, 300, "the resumed training's next checkpoint")
        assert holds_dvc_lock(repo, job.pid)
        second = run_command(["dvc", "repro"], repo, timeout=120)
        marker.unlink()
        output = job.communicate(timeout=300)[0].decode(errors="replace")
    finally:
        kill_group(job)
    assert second.returncode != 0 and LOCK_MESSAGE in second.stderr.decode() + second.stdout.decode()
    assert job.returncode == 0, output[-3000:]
    assert f"after epoch {killed}" in output and "resuming from data/resume/train-" in output, output[-3000:]
    assert state_dict_hash(model) == pipeline["weights"]
    assert history_without_timings(repo / "reports/train/history.csv") == pipeline["history"]
    assert not list((repo / "data/resume").glob("*.pt")), "the scratch checkpoint is removed once done"
    # One training, one MLflow run, whatever happened to it; none left RUNNING (issue 18).
    assert f"continuing MLflow run {run_id}" in output
    runs = store_runs(repo)
    assert set(runs) - set(before) == {run_id} and runs[run_id] == "FINISHED"
    assert "RUNNING" not in runs.values()
    assert epoch_steps(repo, run_id) == list(range(1, 9)), "every epoch once"
    assert "up to date" in run(["dvc", "status", "train"], cwd=repo).stdout


def processed_files_are_complete(repo: Path) -> None:
    for split in ("train", "val", "test"):
        assert len(load_split(repo / f"data/processed/{split}")) > 0  # every shard maps, sizes agree


def test_sigkill_while_fetching_leaves_no_partial_file(pipeline: dict) -> None:
    repo = pipeline["repo"]
    before = outputs_snapshot(repo)
    raw = repo / "data/raw"
    for path in raw.iterdir():  # as on a first run: nothing fetched yet
        path.unlink()
    result = run_command(["python", str(HARNESS), "fetch", "1", "stages/fetch.py"], repo)
    assert result.returncode == -signal.SIGKILL, visible_lines(result.stderr)
    assert list(raw.glob(".*.part")), "the kill landed mid-write, in a temporary file"
    spec = get_dataset("fashion-mnist")
    for remote in spec.files.values():  # a file under its final name is always the verified one
        path = raw / remote.name
        assert not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() == remote.sha256

    run(["dvc", "repro", "train"], cwd=repo)
    assert not list(raw.glob(".*")), "no temporary file left"
    assert outputs_snapshot(repo) == before


def test_sigkill_while_preprocessing_leaves_no_partial_file(pipeline: dict) -> None:
    repo = pipeline["repo"]
    before = outputs_snapshot(repo)
    # Writes: train labels, train images, val labels, val images (killed half-way), ...
    result = run_command(["python", str(HARNESS), "shard", "4", "stages/preprocess.py"], repo)
    assert result.returncode == -signal.SIGKILL, visible_lines(result.stderr)
    assert list((repo / "data/processed").glob(".val.*.tmp/images-00000.npy")), (
        "killed mid-write, out of sight"
    )
    processed_files_are_complete(repo)

    run(["dvc", "repro", "train"], cwd=repo)  # reruns preprocess, or restores it from DVC's run cache
    assert not list((repo / "data/processed").glob(".*")), "no temporary file left"
    assert outputs_snapshot(repo) == before


def test_sigkill_while_exporting_leaves_no_partial_file(pipeline: dict) -> None:
    repo = pipeline["repo"]
    export = repo / "models/export"
    result = run_command(["python", str(HARNESS), "torch.save", "1", "stages/export.py"], repo)
    assert result.returncode == -signal.SIGKILL, visible_lines(result.stderr)
    assert list(export.glob(".weights.pt.*")), "the kill landed mid-write, in a temporary file"
    assert not (export / "weights.pt").exists(), "nothing under the output's name"

    run(["dvc", "repro"], cwd=repo)  # evaluate and export
    assert not list(export.glob(".*")), "no temporary file left in the export folder"
    assert (
        torch.load(export / "weights.pt", weights_only=True).keys()
        == torch.load(repo / "models/model.pt", weights_only=True)["state_dict"].keys()
    )


def test_bad_params_under_dvc_repro_and_the_way_back(pipeline: dict) -> None:
    """DVC deletes a stage's outputs before it runs the stage, so a stage that refuses its params leaves them
    missing from the workspace. They are not lost: `git checkout` brings back params.yaml and the metrics files git
    tracks, `dvc checkout` the outputs in DVC's cache."""
    repo = pipeline["repo"]
    run(["dvc", "repro"], cwd=repo)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run(
        [*git, "add", "-A"], cwd=repo
    )  # what a user commits: params, dvc.lock, metrics; DVC's .gitignore the rest
    run([*git, "commit", "-q", "-m", "good run"], cwd=repo)
    before = outputs_snapshot(repo)
    bad = subset_params()
    bad["train"]["lr"] = 0
    write_params(repo, bad)
    result = run_command(["dvc", "repro"], repo)
    assert result.returncode != 0
    errors = [line for line in visible_lines(result.stderr) if line.startswith("error: ")]
    assert errors == [
        "error: params.yaml: train.lr = 0 is out of range; allowed: a number in (0, 10] or 'auto'"
    ]
    assert not (repo / "models/model.pt").exists(), "DVC removed train's outputs before running it"

    run(["git", "checkout", "--", "params.yaml", "reports"], cwd=repo)
    run(["dvc", "checkout"], cwd=repo)
    assert outputs_snapshot(repo) == before
    assert "up to date" in run(["dvc", "status"], cwd=repo).stdout


def store_runs(repo: Path) -> dict[str, str]:
    """Every run in the repository's MLflow store → its status."""
    with sqlite3.connect(repo / "mlruns/mlflow.db") as db:
        rows = db.execute("select run_uuid, status from runs").fetchall()
    db.close()
    return dict(rows)


def run_tags(repo: Path, run_id: str) -> dict[str, str]:
    with sqlite3.connect(repo / "mlruns/mlflow.db") as db:
        rows = db.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall()
    db.close()
    return dict(rows)


def epoch_steps(repo: Path, run_id: str) -> list[int]:
    with sqlite3.connect(repo / "mlruns/mlflow.db") as db:
        rows = db.execute(
            "select step from metrics where run_uuid = ? and key = 'val_accuracy' order by step", (run_id,)
        ).fetchall()
    db.close()
    return [step for (step,) in rows]


def test_sigterm_ends_the_run_killed_and_the_resumed_repro_finishes_it(
    pipeline: dict, tmp_path: Path
) -> None:
    """Issue 18: SIGTERM (kill, scancel, Kubernetes) unwinds like Ctrl-C: the run ends KILLED, the checkpoint
    stays; the `dvc repro` that resumes continues the same run to FINISHED. (SIGKILL: the test above.)"""
    repo, checkpoint = pipeline["repo"], Checkpoint(pipeline["repo"])
    raw = subset_params()
    raw["train"]["epochs"] = 3  # a training of its own (a new fingerprint), short
    write_params(repo, raw)
    before = store_runs(repo)

    marker = tmp_path / "held"
    job = start_command(["dvc", "repro", "train"], repo, hold_env(marker, "train-*.pt", epoch=1))
    try:
        wait_for(marker.exists, job, 300, "epoch 1's checkpoint")
        signal_group(job, signal.SIGTERM)
        output = job.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        kill_group(job)
    assert job.returncode != 0 and "terminated" in output, output[-2000:]
    (run_id,) = set(store_runs(repo)) - set(before)
    assert store_runs(repo)[run_id] == "KILLED"
    assert run_tags(repo, run_id)["stage.train"] == "killed (SIGTERM)"
    assert "RUNNING" not in store_runs(repo).values()
    assert checkpoint() == 1, "the checkpoint stays"
    (record,) = (repo / "data/resume").glob("*.run.json")
    assert json.loads(record.read_text())["run_id"] == run_id

    resumed = run(["dvc", "repro", "train"], cwd=repo).stdout
    assert f"continuing MLflow run {run_id}" in resumed and "resuming from data/resume/train-" in resumed
    runs = store_runs(repo)
    assert set(runs) - set(before) == {run_id} and runs[run_id] == "FINISHED"
    assert "RUNNING" not in runs.values()
    tags = run_tags(repo, run_id)
    assert tags["resumed"] == "1" and tags["stage.train"] == "finished"
    assert epoch_steps(repo, run_id) == [1, 2, 3]
    assert json.loads((repo / "reports/train/mlflow_run.json").read_text())["run_id"] == run_id
    leftovers = [*(repo / "data/resume").glob("*.pt"), *(repo / "data/resume").glob("*.run.json")]
    assert not leftovers, "checkpoint and record removed once done"
