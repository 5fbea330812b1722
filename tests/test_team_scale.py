"""Teams at scale (issue 18), against real servers on 127.0.0.1 that these tests start and stop: PostgreSQL from
Debian's package (as an unprivileged user), an S3 server (moto), and the team's MLflow server on them with logins
(`python -m image_classifier.team_server ... --login`, what `make team-server TEAM_LOGIN=1 ...` runs).

Teammate A trains through DVC as user `trainer`; a second clone loads `models:/<name>@champion` as user `reader`,
who may read and nothing more; nobody gets in without a password. Then four queued experiments run two at a time
(`dvc queue start -j 2`), once against the local SQLite store and once against the server: every run lands
complete. The data is a small image folder, so each experiment takes seconds. The README's "A team server on
PostgreSQL and S3" and "Parallel experiments" show these commands: keep the two in step.
"""

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, copy_repo, default_params, run, write_params
from image_folders import shapes_folder
from test_team import (
    B_LOADS_CHAMPION,
    BIN,
    BUCKET,
    Server,
    create_bucket_with_user,
    free_port,
    git_commit,
    isolated_env,  # noqa: F401 (an autouse fixture: no credentials of the person running the tests leak in)
    moto_server,
    s3_client,
)

from image_classifier.data import load_split
from image_classifier.models import to_float

pytest.importorskip("psycopg", reason="needs the test extra: pip install -e '.[test]' (psycopg)")
from postgres_server import Postgres, postgres_bin

NEEDS_SERVERS = [
    pytest.mark.slow,
    pytest.mark.skipif(postgres_bin() is None, reason="needs Debian's postgresql (make setup-test)"),
    pytest.mark.skipif(
        not (BIN / "moto_server").exists() or importlib.util.find_spec("flask_wtf") is None,
        reason="needs the test extra: pip install -e '.[test]' (moto[server], Flask-WTF)",
    ),
]
MODEL = "images-classifier"  # registered under the name of the folder data.path names (images)
EXPERIMENT = "image-classifier"
ARTIFACTS = f"s3://{BUCKET}/mlflow"
# Learning rates unlike the baseline's (0.05) and unlike the other queue's: DVC would skip or restore from its run
# cache an experiment it has already run, and nothing would reach the store.
QUEUE_LRS = {"sqlite": (0.02, 0.04, 0.06, 0.08), "server": (0.03, 0.07, 0.09, 0.1)}
EPOCHS = 2


def slow(test):  # the marks every test against real servers carries
    for mark in NEEDS_SERVERS:
        test = mark(test)
    return test


def tiny_params(folder: Path) -> dict:
    """A 90-image folder at 28×28 grey, a tiny CNN, two epochs, one thread per process (two run at once)."""
    raw = default_params()
    raw["data"].update(dataset="folder", path=str(folder), image_size=28, channels=1)
    raw["train"].update(model="cnn", width=4, epochs=EPOCHS, batch_size=8, lr=0.05, device="cpu", threads=1)
    return raw


def team_server_command(port: int, pg_port: int, folder: Path) -> list[str]:
    """The README's team server on PostgreSQL and S3 with logins (= `make team-server TEAM_LOGIN=1 ...`)."""
    database = f"postgresql://mlflow@127.0.0.1:{pg_port}"
    return [
        "python", "-m", "image_classifier.team_server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"{database}/mlflow", "--artifacts-destination", ARTIFACTS,
        "--folder", str(folder), "--login", "--auth-db", f"{database}/mlflow_auth",
    ]  # fmt: skip


@contextlib.contextmanager
def as_user(url: str, user: str, password: str) -> Iterator[None]:
    """In-process MLflow calls to `url` as `user`: the environment variables the pipeline reads too."""
    import mlflow

    wanted = {
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": user,
        "MLFLOW_TRACKING_PASSWORD": password,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in wanted.items():
            patch.setenv(name, value)
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)
        yield


@dataclass
class Team:
    root: Path
    url: str
    postgres: Postgres
    s3_url: str
    s3_keys: tuple[str, str]
    admin_password: str
    passwords: dict[str, str]  # user → password
    a: Path  # teammate A's repository, trained against the server and committed
    a_output: str  # what A's `dvc repro` printed
    folder: Path  # the image folder

    def env(self, user: str) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self.passwords[user],
        }


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    from mlflow.server import get_app_client

    root = tmp_path_factory.mktemp("team-scale")
    pg_port, s3_port, port = free_port(), free_port(), free_port()
    s3_url, url = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{port}"
    postgres, s3 = Postgres(pg_port), moto_server(s3_port, root)
    database_password, admin_password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    server = None
    try:
        s3.launch()
        postgres.start()
        postgres.create_database("mlflow", database_password, "mlflow", "mlflow_auth")
        s3.wait_ready()
        key_id, secret = create_bucket_with_user(s3_url)
        started = time.monotonic()
        # The server's secrets, all from its environment: none is on its command line.
        server_env = {
            "PGPASSWORD": database_password,
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "AWS_ACCESS_KEY_ID": key_id,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": s3_url,
        }
        server = Server(
            team_server_command(port, pg_port, root / "server"),
            root / "mlflow.log",
            f"{url}/health",
            server_env,
        ).start()
        print(f"servers ready in {time.monotonic() - started:.1f}s")

        passwords = {user: secrets.token_urlsafe(12) for user in ("trainer", "reader")}
        with as_user(url, "admin", admin_password):
            admin = get_app_client("basic-auth", tracking_uri=url)
            for user, password in passwords.items():
                admin.create_user(user, password)

        folder = shapes_folder(root / "images", per_class=30, grey=1.0, size_range=(24, 40))
        a = copy_repo(root / "a")
        write_params(a, tiny_params(folder))
        git_commit(a, "Train on the image folder", "params.yaml")
        env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "trainer"}
        env["MLFLOW_TRACKING_PASSWORD"] = passwords["trainer"]
        started = time.monotonic()
        trained = run(["dvc", "repro"], cwd=a, env=env)
        print(f"A's dvc repro against the server took {time.monotonic() - started:.1f}s")
        git_commit(a, "Results", "dvc.lock", "params.yaml", "reports")
        yield Team(
            root=root,
            url=url,
            postgres=postgres,
            s3_url=s3_url,
            s3_keys=(key_id, secret),
            admin_password=admin_password,
            passwords=passwords,
            a=a,
            a_output=trained.stdout + trained.stderr,
            folder=folder,
        )
    finally:
        if (root / "a/.dvc").is_dir():  # no queue worker outlives the servers
            run(["dvc", "queue", "stop", "--kill"], cwd=root / "a", check=False)
        if server:
            server.stop()
        s3.stop()
        postgres.stop()


# --- the team server ------------------------------------------------------------------------------------------


@slow
def test_team_server_on_postgresql_and_s3_with_logins(team: Team) -> None:
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    # Runs and the registry live in PostgreSQL, every artifact in the S3 bucket; A's folder holds no store.
    assert team.postgres.query("mlflow", "select status from runs") == [("FINISHED",)]
    assert team.postgres.query("mlflow", "select name, version from model_versions") == [(MODEL, 1)]
    keys = [
        item["Key"]
        for item in s3_client(team.s3_url, *team.s3_keys).list_objects_v2(Bucket=BUCKET)["Contents"]
    ]
    assert any(key.startswith("mlflow/") and key.endswith("/MLmodel") for key in keys), keys
    assert not (team.a / "mlruns").exists()
    assert team.passwords["trainer"] not in team.a_output, "the pipeline never prints its credentials"

    # Nobody gets in uninvited: no credentials → 401, on the API as on the UI's data.
    for path in (
        "/api/2.0/mlflow/experiments/search?max_results=1",
        "/ajax-api/2.0/mlflow/registered-models/search",
    ):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(team.url + path, timeout=10)
        assert refused.value.code == 401

    # The admin grants the reader READ on the experiment and on the model, and nothing else.
    with as_user(team.url, "admin", team.admin_password):
        admin = get_app_client("basic-auth", tracking_uri=team.url)
        experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
        admin.grant_user_permission("reader", "experiment", experiment_id, "READ")
        admin.grant_user_permission("reader", "registered_model", MODEL, "READ")

    # A second clone, with no access to A's folders, loads the champion as the reader.
    b = copy_repo(team.root / "b")
    test_images = load_split(team.a / "data/processed/test").in_memory().images
    images = to_float(test_images).numpy()
    np.save(b / "images.npy", images)
    hidden = team.root / "a-hidden"
    team.a.rename(hidden)
    try:
        loaded = run(
            [sys.executable, "-c", B_LOADS_CHAMPION, f"models:/{MODEL}@champion"],
            cwd=b,
            # Through the server: by default MLflow 3.17 hands out presigned S3 URLs, which the reader would
            # need to reach (and which moto refuses once its authentication is on).
            env={**team.env("reader"), "HOME": str(b), "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"},
        )
    finally:
        hidden.rename(team.a)
    info = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert info["run_id"] == json.loads((team.a / "reports/train/mlflow_run.json").read_text())["run_id"]
    assert info["artifact_location"].startswith("mlflow-artifacts:")  # proxied: the reader holds no S3 keys
    import onnxruntime

    session = onnxruntime.InferenceSession(str(team.a / "models/export/model.onnx"))
    expected = session.run(["logits"], {"images": images})[0]
    np.testing.assert_allclose(np.load(b / "logits.npy"), expected, atol=1e-4)

    # The reader can read, but cannot log a run or move an alias.
    with as_user(team.url, "reader", team.passwords["reader"]):
        client = MlflowClient()
        assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
        with pytest.raises(MlflowException, match=r"PERMISSION_DENIED|403"):
            client.create_run(experiment_id)
        with pytest.raises(MlflowException, match=r"PERMISSION_DENIED|403"):
            client.set_registered_model_alias(MODEL, "champion", "1")

    # A wrong password stops a stage before it does any work, in one line that names the fix, not the password.
    wrong = "wrong-" + team.passwords["trainer"][::-1]
    refused = run(
        ["python", "stages/evaluate.py"],
        cwd=team.a,
        check=False,
        env={**team.env("trainer"), "MLFLOW_TRACKING_PASSWORD": wrong},
    )
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in lines[0] and team.url in lines[0]
    assert wrong not in refused.stdout + refused.stderr


def test_make_team_server_runs_the_tested_commands() -> None:
    """`make team-server` with PostgreSQL, S3 and logins runs what the tests run."""
    folder = Path("/srv/mlflow-team")
    database = "postgresql://mlflow@127.0.0.1:5432"
    settings = [f"TEAM_STORE={folder}", f"TEAM_DB={database}/mlflow", f"TEAM_ARTIFACTS={ARTIFACTS}"]
    settings += ["TEAM_LOGIN=1", f"TEAM_AUTH_DB={database}/mlflow_auth"]
    dry = run(["make", "-n", "team-server", "PORT=5123", *settings], cwd=REPO).stdout
    assert " ".join(team_server_command(5123, 5432, folder)) in " ".join(dry.replace("\\\n", " ").split())


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--host", "0.0.0.0"], {}, "--host 0.0.0.0 opens the server to the network: add --login"),
        (["--login"], {}, "MLFLOW_AUTH_ADMIN_PASSWORD is not set"),
        (
            ["--login"],
            {"MLFLOW_AUTH_ADMIN_PASSWORD": "password1"},
            "MLFLOW_AUTH_ADMIN_PASSWORD has 9 characters",
        ),
        (
            ["--backend-store-uri", "postgresql://mlflow:" + "hunter2@db/mlflow"],  # split: see test_security
            {},
            "--backend-store-uri holds a password, which process lists would show",
        ),
        (["--backend-store-uri", "sqlite:///mlflow.db"], {}, "a SQLite path must be absolute"),
    ],
)
def test_team_server_refuses_to_open_up_without_a_real_login(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    base = [
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--artifacts-destination",
        str(tmp_path),
    ]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    result = run(
        [sys.executable, "-m", "image_classifier.team_server", *base, "--folder", str(tmp_path), *args],
        cwd=tmp_path,
        check=False,
        env={**clean, **env},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert "hunter2" not in result.stderr


# --- parallel experiment queues -------------------------------------------------------------------------------


NO_WORKER = "Worker status: 0 active, 0 idle"


def queue_status(repo: Path) -> str:
    return run(["dvc", "queue", "status"], cwd=repo).stdout


def wait_for_queue(repo: Path, done: Callable[[str], bool], timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while not done(status := queue_status(repo)):
        if time.monotonic() > deadline:
            run(["dvc", "queue", "stop", "--kill"], cwd=repo, check=False)
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}:\n{status}")
        time.sleep(2)
    return status


def run_queue(repo: Path, prefix: str, env: dict[str, str]) -> dict[str, str]:
    """The README's parallel grid: four queued experiments, two workers. Returns name → queue log.

    A worker keeps the environment of the `dvc queue start` that started it, and serves whatever is queued: the
    workers of an earlier queue must be gone before a queue for another store starts."""
    wait_for_queue(repo, lambda status: NO_WORKER in status, 120, "the earlier workers to stop")
    names = [f"{prefix}-{index}" for index in range(len(QUEUE_LRS[prefix]))]
    for name, lr in zip(names, QUEUE_LRS[prefix], strict=True):
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}"], cwd=repo, env=env)
    run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env)
    status = wait_for_queue(
        repo,
        lambda status: NO_WORKER in status and not re.search(r"\b(Queued|Running)\b", status),
        600,
        "the queue to finish",
    )
    states = {name: re.search(rf"\b{name}\s+.*\b(\w+)\s*$", status, re.M) for name in names}
    logs = {name: run(["dvc", "queue", "logs", name], cwd=repo, check=False).stdout for name in names}
    failed = {
        name: logs[name][-2000:] for name, state in states.items() if not state or state[1] != "Success"
    }
    assert not failed, f"{status}\n{failed}"
    for name, log in logs.items():
        assert "database is locked" not in log and "Traceback" not in log, f"{name}:\n{log[-3000:]}"
    return logs


def assert_complete(runs: list[tuple[str, str]], steps: dict[str, list[int]], tags: dict[str, dict]) -> None:
    """Every queued run FINISHED, with every epoch's metric, test and export results: nothing lost."""
    assert len(runs) == 4, runs
    for run_id, status in runs:
        assert status == "FINISHED", runs
        assert steps[run_id] == list(range(1, EPOCHS + 1)), steps
        assert {tags[run_id].get(f"stage.{s}") for s in ("train", "evaluate", "export")} == {"finished"}


@slow
def test_parallel_queue_on_the_local_sqlite_store(team: Team) -> None:
    """Four runs at once on one SQLite file, starting with no store at all (the first use creates its tables)."""
    assert not (team.a / "mlruns").exists()
    run_queue(team.a, "sqlite", {})
    database = team.a / "mlruns/mlflow.db"
    with sqlite3.connect(database) as db:
        assert db.execute("pragma journal_mode").fetchone() == ("wal",)
        runs = db.execute("select run_uuid, status from runs").fetchall()
        metric_rows = db.execute(
            "select run_uuid, step from metrics where key = 'train_loss' order by step"
        ).fetchall()
        tag_rows = db.execute("select run_uuid, key, value from tags").fetchall()
        versions = db.execute("select count(*) from model_versions").fetchone()[0]
    db.close()
    steps = {run_id: [step for rid, step in metric_rows if rid == run_id] for run_id, _ in runs}
    tags: dict[str, dict] = {run_id: {} for run_id, _ in runs}
    for run_id, key, value in tag_rows:
        tags[run_id][key] = value
    assert_complete(runs, steps, tags)
    assert versions == 4


@slow
def test_parallel_queue_on_the_team_server(team: Team) -> None:
    """The same four experiments against the PostgreSQL + S3 server, logging in from the environment."""
    before = {run_id for (run_id,) in team.postgres.query("mlflow", "select run_uuid from runs")}
    logs = run_queue(team.a, "server", team.env("trainer"))
    assert all(team.passwords["trainer"] not in log for log in logs.values())
    runs = [
        row
        for row in team.postgres.query("mlflow", "select run_uuid, status from runs")
        if row[0] not in before
    ]
    metric_rows = team.postgres.query("mlflow", "select run_uuid, step from metrics where key = 'train_loss'")
    steps = {run_id: sorted(step for rid, step in metric_rows if rid == run_id) for run_id, _ in runs}
    tags: dict[str, dict] = {run_id: {} for run_id, _ in runs}
    for run_id, key, value in team.postgres.query("mlflow", "select run_uuid, key, value from tags"):
        if run_id in tags:
            tags[run_id][key] = value
    assert_complete(runs, steps, tags)
    assert team.postgres.query("mlflow", "select count(*) from model_versions") == [(1 + 4,)]
    assert team.postgres.query("mlflow", "select count(*) from runs where status = 'RUNNING'") == [(0,)]
    shutil.rmtree(team.a / ".dvc/tmp/exps", ignore_errors=True)
