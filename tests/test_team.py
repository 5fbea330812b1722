"""Working as a team (issue 4), against real servers on 127.0.0.1 that these tests start and stop.

Teammate A trains on a small Fashion-MNIST subset, logging to a shared MLflow server, and shares data, models,
the run cache and experiments through a DVC remote (an S3 server: moto's `moto_server`, through the real
`dvc[s3]` client) and git (a bare repository). Teammate B clones, pulls, and gets everything without recomputing
it. The commands are the README's "Working as a team" commands: keep the two in step.

One trained repository (the `team` fixture) serves every test; the experiments fixture adds two `dvc exp run`s.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FASHION_DIR, REPO, copy_repo, run, write_params
from test_pipeline import subset_params

from image_classifier.data import load_split
from image_classifier.models import to_float

BIN = Path(sys.executable).parent
SLOW = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist (make setup)"),
    pytest.mark.skipif(
        not (BIN / "moto_server").exists() or importlib.util.find_spec("dvc_s3") is None,
        reason="needs the test extra: pip install -e '.[test]' (dvc-s3, moto[server])",
    ),
]


def slow(test):  # the marks every test against real servers carries
    for mark in SLOW:
        test = mark(test)
    return test


BUCKET = "team-bucket"
REMOTE_URL = f"s3://{BUCKET}/dvc-store"
MODEL = "fashion-mnist-classifier"
EXPERIMENTS = {"lr-low": 0.02, "lr-high": 0.1}  # name → train.lr


# --- servers --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A server process in its own process group, ready once `ready_url` answers, stopped with its children."""

    def __init__(self, args: list[str], log: Path, ready_url: str, env: dict[str, str] | None = None) -> None:
        self.args, self.log, self.ready_url = args, log, ready_url
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
        self.process: subprocess.Popen | None = None

    def launch(self) -> "Server":
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    def wait_ready(self, timeout_s: float = 180) -> "Server":
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(self.ready_url, timeout=2).close()
                return self
            except urllib.error.HTTPError:
                return self  # it answers, if not with 200
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"{self.args[0]} not ready after {timeout_s} s:\n{self.log_tail()}")

    def start(self) -> "Server":
        return self.launch().wait_ready()

    def stop(self) -> None:
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def moto_server(port: int, folder: Path) -> Server:
    """The README's stand-in for S3: any S3-compatible service reached through `endpointurl`."""
    return Server(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        folder / f"moto-{port}.log",
        f"http://127.0.0.1:{port}/moto-api/",
    )


def s3_client(url: str, key_id: str, secret: str):  # -> botocore S3 client
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )


def create_bucket_with_user(url: str) -> tuple[str, str]:
    """Set up the S3 server as an administrator would: a bucket, a user allowed to use it, and that user's
    access key. Then switch authentication on, so wrong credentials are refused. Returns (key id, secret)."""
    import boto3

    admin = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "admin"}
    iam = boto3.client("iam", aws_secret_access_key="admin", **admin)
    iam.create_user(UserName="teammate")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="teammate", PolicyName="team-bucket", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="teammate")["AccessKey"]
    s3_client(url, "admin", "admin").create_bucket(Bucket=BUCKET)
    request = urllib.request.Request(
        f"{url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(request, timeout=10).close()  # from now on every request must be signed right
    return key["AccessKeyId"], key["SecretAccessKey"]


def mlflow_server_command(port: int, folder: Path) -> list[str]:
    """The README's (and `make team-server`'s) shared MLflow server: SQLite database, proxied artifacts."""
    return [
        "python", "-m", "image_classifier.team_server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", f"{folder}/artifacts",
        "--folder", str(folder),
    ]  # fmt: skip


# --- helpers --------------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lock_outputs(repo: Path, lock_text: str | None = None) -> dict[str, str]:
    """Every output dvc.lock records (files and folders) → its md5 (a folder's ends in .dir)."""
    lock = yaml.safe_load(lock_text if lock_text is not None else (repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def cached_outputs(repo: Path) -> dict[str, str]:
    """The outputs DVC keeps in its cache and pushes: all but the small files git tracks (cache: false)."""
    in_git = set(run(["git", "ls-files"], cwd=repo).stdout.split())
    return {path: md5 for path, md5 in lock_outputs(repo).items() if path not in in_git}


def output_files(repo: Path) -> dict[str, str]:
    """Every file under the outputs in dvc.lock → its sha256."""
    files = {}
    for name in lock_outputs(repo):
        path = repo / name
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[file.relative_to(repo).as_posix()] = sha256(file)
    return files


def assert_nothing_ran(*results: subprocess.CompletedProcess) -> None:
    for result in results:
        assert "Running stage" not in result.stdout + result.stderr, result.stdout


def git_commit(repo: Path, message: str, *paths: str) -> None:
    run(["git", "add", *paths], cwd=repo)
    run(["git", "commit", "-q", "-m", message], cwd=repo)


def init_bare(path: Path) -> Path:
    """The README's git remote on a shared disk: a bare repository whose HEAD names main, so clones check it out."""
    run(["git", "init", "-q", "--bare", str(path)], cwd=path.parent)
    run(["git", "symbolic-ref", "HEAD", "refs/heads/main"], cwd=path)
    return path


# --- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No credentials, tracking server or DVC site cache of the person running the tests leaks in."""
    nowhere = str(tmp_path_factory.mktemp("no-aws") / "absent")
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith(("AWS_", "MLFLOW_")):
                patch.delenv(name)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        patch.setenv("AWS_CONFIG_FILE", nowhere)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        patch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path_factory.mktemp("dvc-site-cache")))
        for role in ("AUTHOR", "COMMITTER"):
            patch.setenv(f"GIT_{role}_NAME", "Teammate")
            patch.setenv(f"GIT_{role}_EMAIL", "teammate@example.com")
        yield


@dataclass
class Team:
    root: Path
    a: Path  # teammate A's repository
    a_before_remote: Path  # a copy of it, trained and committed, before any remote was configured
    origin: Path  # the bare git repository both push to and clone from
    s3_url: str
    key_id: str
    secret: str
    mlflow_url: str
    mlflow_dir: Path
    outputs: dict[str, str]  # A's output files right after training → sha256
    cached: dict[str, str]  # A's committed outputs in DVC's cache → md5
    metrics: dict
    run_id: str
    onnx: Path  # a copy of A's exported ONNX model
    a_local_store: bool  # whether A's pipeline wrote a local MLflow store

    def clone(self, name: str) -> Path:
        """Teammate B's first steps: clone, then give the S3 credentials locally (never committed)."""
        repo = self.root / name
        run(["git", "clone", "-q", str(self.origin), str(repo)], cwd=self.root)
        run(["dvc", "remote", "modify", "--local", "storage", "access_key_id", self.key_id], cwd=repo)
        run(["dvc", "remote", "modify", "--local", "storage", "secret_access_key", self.secret], cwd=repo)
        return repo

    def s3(self):
        return s3_client(self.s3_url, self.key_id, self.secret)


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    root = tmp_path_factory.mktemp("team")
    s3_port, mlflow_port = free_port(), free_port()
    s3_url, mlflow_url = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{mlflow_port}"
    mlflow_dir = root / "mlflow-server"  # the server's own folder: neither teammate's
    mlflow_dir.mkdir()
    s3 = moto_server(s3_port, root)
    mlflow = Server(
        mlflow_server_command(mlflow_port, mlflow_dir), root / "mlflow-server.log", f"{mlflow_url}/health"
    )
    try:
        s3.launch()  # both servers start up while A's repository is made
        mlflow.launch()
        a = copy_repo(root / "a")
        write_params(a, subset_params())
        git_commit(a, "Train on a subset", "params.yaml")
        s3.wait_ready()
        key_id, secret = create_bucket_with_user(s3_url)
        mlflow.wait_ready()
        # A trains, logging to the team's MLflow server, and commits the results.
        run(["dvc", "repro"], cwd=a, env={"MLFLOW_TRACKING_URI": mlflow_url})
        git_commit(a, "Results", "dvc.lock", "params.yaml", "reports")
        (root / "a-export").mkdir()
        onnx = Path(shutil.copy2(a / "models/export/model.onnx", root / "a-export/model.onnx"))
        a_before_remote = Path(shutil.copytree(a, root / "a-before-remote", symlinks=True))

        # A sets up the S3 remote once (config committed, credentials in .dvc/config.local), pushes.
        run(["dvc", "remote", "add", "-d", "storage", REMOTE_URL], cwd=a)
        run(["dvc", "remote", "modify", "storage", "endpointurl", s3_url], cwd=a)
        run(["dvc", "remote", "modify", "--local", "storage", "access_key_id", key_id], cwd=a)
        run(["dvc", "remote", "modify", "--local", "storage", "secret_access_key", secret], cwd=a)
        git_commit(a, "Share data through the team's S3 remote", ".dvc/config")
        run(["dvc", "push", "--run-cache"], cwd=a)
        origin = init_bare(root / "team.git")
        run(["git", "remote", "add", "origin", str(origin)], cwd=a)
        run(["git", "push", "-q", "-u", "origin", "main"], cwd=a)

        yield Team(
            root=root,
            a=a,
            a_before_remote=a_before_remote,
            origin=origin,
            s3_url=s3_url,
            key_id=key_id,
            secret=secret,
            mlflow_url=mlflow_url,
            mlflow_dir=mlflow_dir,
            outputs=output_files(a),
            cached=cached_outputs(a),
            metrics=json.loads((a / "reports/evaluate/metrics.json").read_text()),
            run_id=json.loads((a / "reports/train/mlflow_run.json").read_text())["run_id"],
            onnx=onnx,
            a_local_store=(a / "mlruns").exists(),
        )
    finally:
        mlflow.stop()
        s3.stop()


@pytest.fixture(scope="module")
def experiments(team: Team) -> dict[str, str]:
    """A runs two experiments and pushes both (git refs to origin, outputs to S3). Returns name → git ref.
    They log to A's own MLflow store, so the team server's champion stays the model A trained above."""
    for name, lr in EXPERIMENTS.items():
        run(["dvc", "exp", "run", "-n", name, "-S", f"train.lr={lr}"], cwd=team.a)
    run(["dvc", "exp", "push", "origin", *EXPERIMENTS], cwd=team.a)
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=team.a).stdout.split()
    return {name: next(ref for ref in refs if ref.endswith(f"/{name}")) for name in EXPERIMENTS}


# --- tests ----------------------------------------------------------------------------------------------------


@slow
def test_b_gets_everything_through_s3_without_recomputing(team: Team) -> None:
    b = team.clone("b")
    pulled = run(["dvc", "pull"], cwd=b)
    reproduced = run(["dvc", "repro"], cwd=b)
    assert_nothing_ran(pulled, reproduced)
    assert "Data and pipelines are up to date." in reproduced.stdout
    assert output_files(b) == team.outputs  # data, checkpoint, models, reports: byte for byte

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], cwd=b).stdout)
    assert shown[""]["data"]["reports/evaluate/metrics.json"]["data"]["accuracy"] == team.metrics["accuracy"]
    head = run(["git", "rev-parse", "HEAD"], cwd=b).stdout.strip()
    table = json.loads(run(["dvc", "exp", "show", "--json"], cwd=b).stdout)
    row = next(row for row in table if row["rev"] == head)
    assert row["data"]["metrics"]["reports/evaluate/metrics.json"]["data"] == team.metrics

    # A pushed the run cache too, and the credentials stayed out of git.
    keys = [item["Key"] for item in team.s3().list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert {f"dvc-store/files/md5/{md5[:2]}/{md5[2:]}" for md5 in team.cached.values()} <= set(keys)
    assert any(key.startswith("dvc-store/runs/") for key in keys)
    history = run(["git", "log", "-p", "--all"], cwd=b).stdout
    assert REMOTE_URL in history and team.key_id not in history and team.secret not in history


@slow
def test_b_applies_a_pushed_experiment_without_training(team: Team, experiments: dict[str, str]) -> None:
    b = team.clone("b-exp")
    pulled = run(["dvc", "exp", "pull", "origin", *EXPERIMENTS], cwd=b)
    listed = run(["dvc", "exp", "list"], cwd=b).stdout
    assert all(name in listed for name in EXPERIMENTS), listed
    applied = run(["dvc", "exp", "apply", "lr-low"], cwd=b)
    fetched = run(["dvc", "pull"], cwd=b)
    reproduced = run(["dvc", "repro"], cwd=b)
    assert_nothing_ran(pulled, applied, fetched, reproduced)
    assert "Data and pipelines are up to date." in reproduced.stdout

    assert yaml.safe_load((b / "params.yaml").read_text())["train"]["lr"] == EXPERIMENTS["lr-low"]
    experiment_lock = run(["git", "show", f"{experiments['lr-low']}:dvc.lock"], cwd=team.a).stdout
    assert lock_outputs(b) == lock_outputs(team.a, experiment_lock)
    md5 = lock_outputs(b)["models/model.pt"]
    a_file = team.a / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    assert (b / "models/model.pt").read_bytes() == a_file.read_bytes()  # A's experiment model, untouched
    assert sha256(b / "models/model.pt") != team.outputs["models/model.pt"]  # not the baseline's
    metrics = run(
        ["git", "show", f"{experiments['lr-low']}:reports/evaluate/metrics.json"], cwd=team.a
    ).stdout
    assert json.loads((b / "reports/evaluate/metrics.json").read_text()) == json.loads(metrics)


B_LOADS_CHAMPION = """
import json, sys
import mlflow, numpy as np
from mlflow import MlflowClient

uri = sys.argv[1]
model = mlflow.pyfunc.load_model(uri)
np.save("logits.npy", model.predict(np.load("images.npy")))
version = MlflowClient().get_model_version_by_alias(*uri.removeprefix("models:/").split("@"))
experiment = mlflow.get_experiment_by_name("image-classifier")
print(json.dumps({"run_id": version.run_id, "artifact_location": experiment.artifact_location}))
"""


@slow
def test_b_loads_the_champion_from_the_shared_mlflow_server(team: Team) -> None:
    b = team.root / "b-mlflow"  # B's folder: no checkout, no data, no store
    b.mkdir()
    test_images = load_split(team.a / "data/processed/test").images[:64]
    images = to_float(test_images).numpy()
    np.save(b / "images.npy", images)

    assert not team.a_local_store, "A's pipeline logged to the server, not to a store in A's folder"
    hidden = team.root / "a-hidden"
    team.a.rename(hidden)  # B cannot read A's folder, even by accident
    try:
        loaded = run(
            [sys.executable, "-c", B_LOADS_CHAMPION, f"models:/{MODEL}@champion"],
            cwd=b,
            env={"MLFLOW_TRACKING_URI": team.mlflow_url, "HOME": str(b)},
        )
    finally:
        hidden.rename(team.a)
    info = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert info["run_id"] == team.run_id  # the model A trained above
    assert info["artifact_location"].startswith("mlflow-artifacts:")  # proxied: no storage credentials needed
    assert any((team.mlflow_dir / "artifacts").rglob("MLmodel")), "artifacts live in the server's folder"

    import onnxruntime

    session = onnxruntime.InferenceSession(str(team.onnx), providers=["CPUExecutionProvider"])
    expected = session.run(["logits"], {"images": images})[0]
    logits = np.load(b / "logits.npy")
    assert logits.shape == expected.shape == (64, 10)
    assert (logits.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


@slow
def test_local_folder_remote_and_git_hook_push_the_data(team: Team) -> None:
    """The README's default remote, a folder outside the repository; `dvc install` makes `git push` push data."""
    a = team.a_before_remote
    storage = team.root / "dvc-storage"
    run(["dvc", "remote", "add", "-d", "storage", str(storage)], cwd=a)
    git_commit(a, "Share data through a folder", ".dvc/config")
    run(["dvc", "install"], cwd=a)
    origin = init_bare(team.root / "team-folder.git")
    run(["git", "remote", "add", "origin", str(origin)], cwd=a)
    assert not storage.exists()
    run(["git", "push", "-q", "-u", "origin", "main"], cwd=a)  # the pre-push hook runs `dvc push`
    stored = {f"{p.parent.name}{p.name}" for p in (storage / "files/md5").glob("*/*")}
    assert set(team.cached.values()) <= stored, set(team.cached.values()) - stored

    b = team.root / "b-folder"
    run(["git", "clone", "-q", str(origin), str(b)], cwd=team.root)
    pulled = run(["dvc", "pull"], cwd=b)
    reproduced = run(["dvc", "repro"], cwd=b)
    assert_nothing_ran(pulled, reproduced)
    assert "Data and pipelines are up to date." in reproduced.stdout
    assert output_files(b) == team.outputs


@slow
def test_push_to_a_stopped_s3_server_fails_clearly_and_a_later_push_completes(team: Team) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    backup = moto_server(port, team.root)
    local_remote = ["dvc", "remote", "modify", "--local", "backup"]
    try:
        backup.start()
        s3_client(url, "backup", "backup").create_bucket(Bucket="backup")
        run(["dvc", "remote", "add", "--local", "backup", "s3://backup/dvc-store"], cwd=team.a)
        run([*local_remote, "endpointurl", url], cwd=team.a)
        run([*local_remote, "access_key_id", "backup"], cwd=team.a)
        run([*local_remote, "secret_access_key", "backup"], cwd=team.a)
        backup.stop()

        cache = team.a / ".dvc/cache"
        before = {p: p.stat().st_size for p in cache.rglob("*") if p.is_file()}
        failed = run(["dvc", "push", "-r", "backup"], cwd=team.a, check=False)
        assert failed.returncode != 0
        assert f'Could not connect to the endpoint URL: "{url}/backup/dvc-store/' in failed.stderr, (
            failed.stderr
        )
        assert {p: p.stat().st_size for p in cache.rglob("*") if p.is_file()} == before  # nothing lost
        assert "Data and pipelines are up to date." in run(["dvc", "status"], cwd=team.a).stdout

        backup.start()  # back, empty (moto keeps nothing): the bucket is recreated as an admin would
        s3_client(url, "backup", "backup").create_bucket(Bucket="backup")
        pushed = run(["dvc", "push", "-r", "backup"], cwd=team.a)
        assert "pushed" in pushed.stdout, pushed.stdout
        assert "in sync" in run(["dvc", "status", "-c", "-r", "backup"], cwd=team.a).stdout
    finally:
        backup.stop()
        run(["dvc", "remote", "remove", "--local", "backup"], cwd=team.a, check=False)


@slow
def test_pull_of_an_object_missing_on_the_remote_names_the_output(team: Team) -> None:
    md5 = team.cached["models/model.pt"]
    key = f"dvc-store/files/md5/{md5[:2]}/{md5[2:]}"
    s3 = team.s3()
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3.delete_object(Bucket=BUCKET, Key=key)
    try:
        c = team.clone("c-missing")
        pulled = run(["dvc", "pull"], cwd=c, check=False)
    finally:
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    assert pulled.returncode != 0
    assert "Checkout failed for following targets:\nmodels/model.pt" in pulled.stderr, pulled.stderr
    assert md5 in pulled.stderr
    assert not (c / "models/model.pt").exists()
    assert sha256(c / "models/export/model.onnx") == team.outputs["models/export/model.onnx"]  # the rest came


@slow
def test_wrong_or_missing_credentials_fail_clearly_without_printing_the_secret(team: Team) -> None:
    c = team.root / "c-credentials"
    run(["git", "clone", "-q", str(team.origin), str(c)], cwd=team.root)

    missing = run(["dvc", "pull"], cwd=c, check=False)
    assert missing.returncode != 0
    assert "failed to connect to s3" in missing.stderr and "Unable to locate credentials" in missing.stderr

    wrong = "wrong-" + team.secret[::-1]
    from_env = {"AWS_ACCESS_KEY_ID": team.key_id, "AWS_SECRET_ACCESS_KEY": wrong}
    refused = run(["dvc", "pull", "-v"], cwd=c, check=False, env=from_env)
    run(["dvc", "remote", "modify", "--local", "storage", "access_key_id", team.key_id], cwd=c)
    run(["dvc", "remote", "modify", "--local", "storage", "secret_access_key", wrong], cwd=c)
    refused_local = run(["dvc", "push", "-v"], cwd=c, check=False)
    for result in (refused, refused_local):
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "Forbidden" in output and "403" in output, output[-2000:]
        assert wrong not in output and team.secret not in output
    assert not (c / "models/model.pt").exists()


def test_make_team_server_runs_the_tested_command() -> None:
    """`make team-server` runs the server command the tests run: on 127.0.0.1 unless TEAM_HOST opts out."""
    folder = Path("/srv/mlflow-team")
    dry = run(["make", "-n", "team-server", "PORT=5123", f"TEAM_STORE={folder}"], cwd=REPO).stdout
    assert " ".join(mlflow_server_command(5123, folder)) in " ".join(dry.replace("\\\n", " ").split())
    opened = run(
        [
            "make",
            "-n",
            "team-server",
            "TEAM_HOST=0.0.0.0",
            "TEAM_ALLOWED_HOSTS=mlflow.example.com",
            "TEAM_LOGIN=1",
        ],
        cwd=REPO,
    ).stdout
    assert "--host 0.0.0.0" in opened and "--allowed-hosts mlflow.example.com --login" in opened
