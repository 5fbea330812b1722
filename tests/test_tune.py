"""`tune`: the search space's checks, a study with pruning whose winner `dvc exp run` reproduces, two processes
on one study, and Ctrl-C then resume. The studies run on a 2,000-image Fashion-MNIST subset, 3 epochs a trial."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import FASHION_DIR, REPO, copy_repo, default_params, run, tiny_params_dict, write_params
from fault_helpers import hold_env, kill_group, signal_group, start_command, wait_for
from postgres_server import Postgres, postgres_bin

from image_classifier.errors import UserError
from image_classifier.search_space import load_space

BIN = Path(sys.executable).parent
SPACE = "train.lr: {low: 0.001, high: 2.0, log: true}\ntrain.width: {choices: [4, 8]}\n"


# --- the search space ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train.lrr: {low: 0.1, high: 1}", "'train.lrr' is not a train.* param or data.image_size"),
        ("preprocess.seed: {choices: [1, 2]}", "'preprocess.seed' is not a train.* param"),
        ("train.lr: 0.1", "train.lr must be {low: ..., high: ...} or {choices: [...]}"),
        ("train.lr: {low: 0.5, high: 0.1}", "train.lr: low (0.5) must be below high (0.1)"),
        ("train.lr: {low: 0, high: 1, log: true}", "train.lr: a log scale needs low > 0"),
        ("train.lr: {low: 0.1, high: 20}", "train.lr = 20 is out of range; allowed: a number in (0, 10]"),
        ("train.optimizer: {choices: [sgd, adam]}", "train.optimizer = 'adam' is not allowed"),
        ("train.lr: {low: 0.1, hi: 1}", "train.lr.hi: Extra inputs are not permitted"),
        ("train.lr: {choices: []}", "train.lr.choices: List should have at least 1 item"),
        ("[1, 2]", "must map param keys"),
        ("train.lr: {low: 0.1, high: [", "not YAML"),
    ],
)
def test_a_bad_search_space_fails_in_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tune.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_space(path, tiny_params_dict())
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_repositorys_search_space_is_valid() -> None:
    space = load_space(REPO / "tune.yaml", default_params())
    assert "train.lr" in space


def test_the_command_refuses_a_bad_space_with_exit_status_2(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("train.lr: {low: 0.1, high: 20}\n")
    done = subprocess.run(
        [BIN / "tune", "--trials", "1", "--space", str(tmp_path / "bad.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "train.lr = 20 is out of range" in done.stderr


# --- studies ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FASHION_DIR.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    repo = copy_repo(tmp_path_factory.mktemp("tune") / "repo")
    raw = default_params()
    raw["preprocess"].update(val_size=500, train_subset=2000)
    raw["train"].update(epochs=3, width=8)
    write_params(repo, raw)
    (repo / "tune.yaml").write_text(SPACE)
    run(["git", "commit", "-qam", "a small study"], cwd=repo)
    run(["dvc", "repro", "preprocess"], cwd=repo)
    return repo


def tune(repo: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run([str(BIN / "tune"), *args], cwd=repo, env=env or {})


def study_trials(repo: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{repo}/mlruns/optuna.db").trials


def mlflow_runs(repo: Path, study: str) -> list[dict]:
    """Every run of the study: id, status and its tags, straight from the store."""
    with sqlite3.connect(repo / "mlruns/mlflow.db") as db:
        ids = [
            row[0]
            for row in db.execute(
                "select run_uuid from tags where key = 'tune.study' and value = ?", (study,)
            )
        ]
        runs = []
        for run_id in ids:
            status = db.execute("select status from runs where run_uuid = ?", (run_id,)).fetchone()[0]
            tags = dict(db.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall())
            params = dict(
                db.execute("select key, value from params where run_uuid = ?", (run_id,)).fetchall()
            )
            runs.append({"id": run_id, "status": status, "tags": tags, "params": params})
        return runs


@pytest.mark.slow
def test_a_study_prunes_logs_each_trial_and_its_winner_reproduces(repo: Path, tmp_path: Path) -> None:
    output = tune(repo, "--trials", "4", "--seed", "0", "--study", "s", env={"TMPDIR": str(tmp_path)}).stdout
    assert not list(tmp_path.glob("tune-*")), "the study's scratch folder (its checkpoints) is removed"
    trials = study_trials(repo, "s")
    states = [trial.state.name for trial in trials]
    assert len(trials) == 4 and "PRUNED" in states and "COMPLETE" in states

    runs = mlflow_runs(repo, "s")
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    assert len(parents) == 1 and len(children) == 4
    assert {r["tags"]["mlflow.parentRunId"] for r in children} == {parents[0]["id"]}
    assert sorted(r["tags"]["tune.state"] for r in children) == sorted(states)
    assert all("train.lr" in r["params"] for r in children)
    assert {r["status"] for r in children if r["tags"]["tune.state"] == "PRUNED"} == {"KILLED"}
    assert parents[0]["tags"]["tune.best_trial"] == str(
        max((t for t in trials if t.value is not None), key=lambda t: t.value).number
    )

    command = output.strip().splitlines()[-1]
    assert command.startswith("dvc exp run -S ")
    run(command.split(), cwd=repo)
    best = max(trial.value for trial in trials if trial.state.name == "COMPLETE")
    metrics = json.loads((repo / "reports/train/metrics.json").read_text())
    assert metrics["best_val_accuracy"] == best  # the same training, bit for bit


@pytest.fixture
def postgres_storage() -> Iterator[tuple[str, dict[str, str]]]:
    """A real PostgreSQL on 127.0.0.1 (Debian's package): the storage URL, and the password in the environment
    (PGPASSWORD), never in the URL."""
    if postgres_bin() is None:
        pytest.skip("needs Debian's postgresql (make setup-test installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Postgres(port).start()
    try:
        server.create_database("optuna", "tune-test-password", "optuna")
        yield f"postgresql+psycopg://optuna@127.0.0.1:{port}/optuna", {"PGPASSWORD": "tune-test-password"}
    finally:
        server.stop()


def two_tunes_at_once(repo: Path, study: str, *storage: str, env: dict[str, str] | None = None) -> None:
    command = [str(BIN / "tune"), "--trials", "2", "--study", study, *storage]
    processes = [
        subprocess.Popen(
            command,
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        for _ in range(2)
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]


def check_no_trial_lost_or_repeated(repo: Path, trials: list[optuna.trial.FrozenTrial], study: str) -> None:
    assert sorted(trial.number for trial in trials) == [0, 1, 2, 3]
    assert all(trial.state.name in ("COMPLETE", "PRUNED") for trial in trials)
    children = [r for r in mlflow_runs(repo, study) if "mlflow.parentRunId" in r["tags"]]
    assert sorted(int(r["tags"]["tune.trial"]) for r in children) == [0, 1, 2, 3]
    assert len({r["tags"]["mlflow.parentRunId"] for r in children}) == 1  # one parent for both processes


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study_without_losing_or_repeating_a_trial(repo: Path) -> None:
    two_tunes_at_once(repo, "pair")
    check_no_trial_lost_or_repeated(repo, study_trials(repo, "pair"), "pair")


@pytest.mark.slow
def test_two_processes_share_one_postgresql_study(repo: Path, postgres_storage: tuple[str, dict]) -> None:
    url, env = postgres_storage
    two_tunes_at_once(repo, "pg", "--storage", url, env=env)
    storage = optuna.storages.RDBStorage(url.replace("optuna@", f"optuna:{env['PGPASSWORD']}@"))
    check_no_trial_lost_or_repeated(repo, optuna.load_study(study_name="pg", storage=storage).trials, "pg")


@pytest.mark.slow
def test_ctrl_c_keeps_finished_trials_and_tune_resumes_the_study(repo: Path, tmp_path: Path) -> None:
    # Trial 1 holds after its first epoch's checkpoint until the Ctrl-C (tests/hold): the signal lands inside it
    # on any machine. No trial can be pruned before it: pruning starts once two trials have completed.
    scratch, marker = tmp_path / "tmp", tmp_path / "held"
    scratch.mkdir()
    command = [str(BIN / "tune"), "--trials", "3", "--study", "stopped"]
    job = start_command(command, repo, {**hold_env(marker, "trial-1.pt"), "TMPDIR": str(scratch)})
    try:
        wait_for(marker.exists, job, 600, "trial 1's first checkpoint")
        held = [path.name for path in scratch.glob("tune-*/*")]
        assert held == ["trial-1.pt"], (
            "the running trial's checkpoint, in the scratch folder; trial 0's is gone"
        )
        signal_group(job, signal.SIGINT)
        output = job.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        kill_group(job)
    assert job.returncode == 130, output[-2000:]
    assert not list(scratch.glob("tune-*")), "the interrupted study's scratch folder is removed"
    states = [trial.state.name for trial in study_trials(repo, "stopped")]
    assert states == ["COMPLETE", "FAIL"]
    interrupted = [r for r in mlflow_runs(repo, "stopped") if r["tags"].get("tune.trial") == "1"]
    assert [r["status"] for r in interrupted] == ["KILLED"]
    parent = [r for r in mlflow_runs(repo, "stopped") if "mlflow.parentRunId" not in r["tags"]]
    assert [r["status"] for r in parent] == ["KILLED"]  # honest: interrupted, not failed and not running

    tune(repo, "--trials", "1", "--study", "stopped", env={"TMPDIR": str(scratch)})
    assert not list(scratch.glob("tune-*")), "a finished study's scratch folder is removed"
    assert {r["status"] for r in mlflow_runs(repo, "stopped") if "mlflow.parentRunId" not in r["tags"]} == {
        "FINISHED"
    }
    trials = study_trials(repo, "stopped")
    assert [trial.number for trial in trials] == [0, 1, 2] and trials[2].state.name == "COMPLETE"
