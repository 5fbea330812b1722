"""Where runs go: the tracking URI, its display without passwords, the SQLite store's first-use lock, the
fail-fast connection check and the experiment."""

import contextlib
import fcntl
import os
import re
import sqlite3
import sys
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from image_classifier.errors import UserError, one_line
from image_classifier.params import TrackingParams

STORE_DIR = "mlruns"
# How long the reachability check waits for a tracking server before the train stage gives up.
PROBE_TIMEOUT_S = 5


def repo_root() -> Path:
    """The user's repository. `dvc exp run --temp/--queue` runs stages in a copy under .dvc/tmp/exps that DVC
    deletes afterwards; it sets DVC_ROOT to the original repository, so runs land in the store that stays."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: TrackingParams) -> str:
    """$MLFLOW_TRACKING_URI, else `tracking.uri`, else the SQLite store in mlruns/ at the repository root.

    A relative SQLite path is taken from the repository root, not from DVC's temporary copy of it."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.uri
    if not uri:
        return f"sqlite:///{repo_root() / STORE_DIR / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{repo_root() / uri.removeprefix('sqlite:///')}"
    return uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def display_uri(uri: str) -> str:
    """`uri` without the password in its user part (`http://user@host` stays, the password goes): for messages
    and files. The pipeline's own credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD: it never prints them."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc + (f":{parts.port}" if parts.port else "")))


@contextmanager
def _sqlite_store_lock(database: Path) -> Iterator[None]:
    """Parallel runs (`dvc queue start -j N`) share one SQLite store. MLflow creates its tables on first use
    with no lock (two processes race and one fails), so that first use happens under an exclusive file lock.
    Then WAL, once per database (SQLite keeps it): readers no longer block the writer and a write does not
    wait for readers; MLflow already sets busy_timeout to 20 s, so concurrent writers queue instead of failing
    with "database is locked". WAL needs a local disk: for a shared folder use a tracking server."""
    with (database.parent / f"{database.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with sqlite3.connect(database, timeout=20) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
        connection.close()
        yield


@contextmanager
def quick_requests() -> Iterator[None]:
    """Within the block, an HTTP tracking server gets one try and PROBE_TIMEOUT_S seconds, instead of MLflow's
    default of minutes of retries; the defaults come back afterwards, for the uploads of a long run."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def request_failure(error: Exception) -> str:
    """The cause of a failed request in a few words ('[Errno 111] Connection refused'), else the message."""
    text = one_line(error, limit=None)
    for pattern in (r"\[Errno -?\d+\][^'\")]*", r"[Rr]ead timed out", r"timed out", r"error code \d+[^.]*"):
        match = re.search(pattern, text)
        if match:
            return match.group(0).strip()
    return text[:160]


def connect(params: TrackingParams) -> str:
    """Point MLflow at the configured store, create the experiment if needed, and fail fast, in one line
    naming the URI, if the store cannot be used. Returns the URI."""
    uri = tracking_uri(params)
    database = _sqlite_path(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if not sys.stderr.isatty():  # MLflow's artifact bars would write carriage-return updates into a log file
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with quick_requests(), _sqlite_store_lock(database) if database else contextlib.nullcontext():
            _use_experiment(params.experiment, database)
    except (MlflowException, OSError, sqlite3.Error) as error:
        raise UserError(
            f"cannot use the MLflow tracking store {display_uri(uri)} ({request_failure(error)}); "
            + _remedy(error)
        ) from None
    return uri


def _use_experiment(name: str, database: Path | None) -> None:
    """Make `name` the active experiment, creating it if needed. Against a server, a parallel run may create it
    between our look and our create: its RESOURCE_ALREADY_EXISTS means the experiment is there."""
    if mlflow.get_experiment_by_name(name) is None:
        # Artifacts of a SQLite store sit beside the database; a server decides for itself.
        artifacts = (database.parent / "artifacts").as_uri() if database is not None else None
        try:
            mlflow.create_experiment(name, artifact_location=artifacts)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(name)


def _remedy(error: Exception) -> str:
    """What to do about a store that refused us: a login problem, or a store that is not there."""
    text = str(error)
    if "401" in text or "Unauthorized" in text:
        return (
            "the server wants a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(the username or password given is wrong, or none was given)"
        )
    if "403" in text or "PERMISSION_DENIED" in text:
        return "the user in MLFLOW_TRACKING_USERNAME may not use this experiment: ask the server's admin"
    return "start it, or point MLFLOW_TRACKING_URI or tracking.uri in params.yaml at one that works"
