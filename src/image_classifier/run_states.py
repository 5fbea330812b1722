"""Honest MLflow run states: no run is left RUNNING by an interruption.

- Ctrl-C and SIGTERM (errors.Terminated) end the run KILLED, an error ends it FAILED; either way a tag
  `stage.<stage>` says which stage stopped and why (MLflow's own `with start_run()` would say FAILED for both).
- SIGKILL (the OOM killer, a lost machine) runs nothing: the run stays RUNNING. So training records its run id
  beside its resume checkpoint, and the training that resumes from that checkpoint continues the same run: one
  training, one run, whatever happened to it. A record left by a training that will never resume (its params or
  data changed since) has its run closed as KILLED by the next training in the same folder.
"""

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from image_classifier.errors import Terminated, one_line
from image_classifier.files import atomic_path

RUNNING, KILLED = RunStatus.to_string(RunStatus.RUNNING), RunStatus.to_string(RunStatus.KILLED)
FAILED = RunStatus.to_string(RunStatus.FAILED)
Quickly = Callable[[], AbstractContextManager[None]]
# The metric whose steps say which epochs a continued run already holds (every epoch logs it).
EPOCH_METRIC = "train_loss"


def stage_tag(stage: str) -> str:
    return f"stage.{stage}"


@contextmanager
def ended_honestly(stage: str, end_quickly: Quickly) -> Iterator[None]:
    """Inside an active run: on success tag `stage.<stage>` finished; on Ctrl-C or SIGTERM end the run KILLED,
    on an exception FAILED, each with the cause in the tag, then re-raise. `end_quickly` bounds the requests
    (a dying process must not wait minutes of retries on an unreachable server)."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        cause = "SIGTERM" if isinstance(interrupt, Terminated) else "Ctrl-C"
        _end(stage, KILLED, f"killed ({cause})", end_quickly)
        raise
    except Exception as error:
        _end(stage, FAILED, f"failed: {one_line(error, limit=500)}", end_quickly)
        raise
    mlflow.set_tag(stage_tag(stage), "finished")


def _end(stage: str, status: str, why: str, end_quickly: Quickly) -> None:
    # A store that is gone cannot be told: the run stays RUNNING there until a resumed training closes it. The
    # original exception is what the user must see, not this one.
    with end_quickly():
        with contextlib.suppress(MlflowException, OSError):
            mlflow.set_tag(stage_tag(stage), why)
        with contextlib.suppress(MlflowException, OSError):
            mlflow.end_run(
                status
            )  # takes the run off MLflow's stack first, so its `with` does not end it again


# --- the record beside a resume checkpoint --------------------------------------------------------------------


def record_path(checkpoint: Path) -> Path:
    """Where the id of the run a checkpoint belongs to is kept: beside it, named after it."""
    return checkpoint.with_name(checkpoint.stem + ".run.json")


def write_record(path: Path, run_id: str, store: str) -> None:
    """The run id, the store it lives in, and which process on which machine is training into it."""
    record = {"run_id": run_id, "store": store, "host": socket.gethostname(), "pid": os.getpid()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(record, indent=2) + "\n")


def read_record(path: Path) -> dict[str, str] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # none, or a damaged one: train into a new run
    return record if isinstance(record, dict) and "run_id" in record else None


def forget(checkpoint: Path) -> None:
    """Training completed: its record goes first, then the checkpoint. Killed in between, the rerun resumes
    the finished checkpoint into a new, complete run rather than restart from scratch inside the finished one."""
    record_path(checkpoint).unlink(missing_ok=True)
    checkpoint.unlink(missing_ok=True)


def run_to_continue(path: Path, store: str) -> str | None:
    """The id of the run an interrupted training left in this store, if its record is here and the run still
    exists (not deleted); else None, and the training opens a new run."""
    record = read_record(path)
    if record is None or record.get("store") != store:
        return None
    try:
        run = MlflowClient().get_run(record["run_id"])
    except MlflowException:
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def logged_steps(run_id: str) -> set[int]:
    """The epochs a continued run already holds, so the replayed history adds only the missing ones."""
    return {metric.step for metric in MlflowClient().get_metric_history(run_id, EPOCH_METRIC)}


def _may_be_alive(record: dict[str, str]) -> bool:
    """Whether the process that wrote `record` may still be training. One on another machine (a shared folder)
    cannot be checked from here: it is left alone."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        pid = int(record.get("pid", 0))
    except ValueError:
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def close_abandoned(folder: Path, keep: Path, store: str) -> list[str]:
    """Close as KILLED the RUNNING runs of records in `folder` other than `keep` whose process is gone: their
    training was SIGKILLed and will never resume (its params, data or code changed). Returns their ids."""
    closed = []
    for path in sorted(Path(folder).glob("*.run.json")):
        record = read_record(path)
        if path == keep or record is None or record.get("store") != store or _may_be_alive(record):
            continue
        client = MlflowClient()
        try:
            if client.get_run(record["run_id"]).info.status != RUNNING:
                continue
            client.set_tag(record["run_id"], stage_tag("train"), "killed (the process died; not resumed)")
            client.set_terminated(record["run_id"], KILLED)
        except MlflowException:
            continue
        closed.append(record["run_id"])
    return closed
