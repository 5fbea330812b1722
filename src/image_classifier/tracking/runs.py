"""A run's life and what it records: train opens one run; evaluate and export reopen it by the id train wrote to
a small DVC-tracked file (the run file), so one row in the MLflow UI holds train, validation and test metrics and
every exported file."""

import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from image_classifier import run_states
from image_classifier.data import Split
from image_classifier.errors import UserError
from image_classifier.files import atomic_path
from image_classifier.tracking.provenance import uncommitted_diff
from image_classifier.tracking.store import display_uri, quick_requests, repo_root

DIFF_ARTIFACT = "source/uncommitted.diff"


def run_name() -> str:
    """The DVC experiment's name under `dvc exp run`, else one MLflow makes up (readable, e.g. 'bold-owl-42')."""
    return os.environ.get("DVC_EXP_NAME") or ""


@contextmanager
def start_run(
    flat_params: dict[str, Any], tags: dict[str, str], checkpoint: Path | None = None
) -> Iterator[str]:
    """The training's run, with every param and the source tags; yields its id. It ends FINISHED, FAILED if the
    block raises, KILLED on Ctrl-C or SIGTERM (run_states.ended_honestly).

    With the resume `checkpoint` this training uses, the run id is recorded beside it: a training resumed after
    any interruption, SIGKILL included, continues the run its checkpoint belongs to instead of leaving that
    one RUNNING and opening another (tag `resumed` counts how often).

    A run from a dirty tree outside a DVC experiment also gets the uncommitted changes as an artifact, and a
    `reproduce` command that applies them."""
    store = display_uri(mlflow.get_tracking_uri())
    record = run_states.record_path(checkpoint) if checkpoint else None
    continued = run_states.run_to_continue(record, store) if record else None
    if record:
        run_states.close_abandoned(record.parent, record, store)
    with (
        (
            mlflow.start_run(run_id=continued)
            if continued
            else mlflow.start_run(run_name=run_name() or None, tags=tags)
        ) as run,
        run_states.ended_honestly("train", quick_requests),
    ):
        if continued:
            resumed = int(run.data.tags.get("resumed", "0")) + 1
            mlflow.set_tags({**tags, "resumed": str(resumed)})
            print(f"continuing MLflow run {continued}, which the interrupted training left")
        if record:
            run_states.write_record(record, run.info.run_id, store)
        mlflow.log_params(flat_params)
        if tags.get("git.dirty") == "true" and "dvc.experiment" not in tags:
            _log_uncommitted_changes(run.info.run_id, tags.get("git.commit", "HEAD"))
        yield run.info.run_id


def _log_uncommitted_changes(run_id: str, commit: str) -> None:
    """The dirty tree's changes as an artifact, and a `reproduce` tag that applies them to `commit`."""
    diff = uncommitted_diff()
    if diff:
        mlflow.log_text(diff + "\n", DIFF_ARTIFACT)
        mlflow.set_tag(
            "reproduce",
            f"git checkout {commit} && mlflow artifacts download -r {run_id} "
            f"-a {DIFF_ARTIFACT} -d . && git apply {DIFF_ARTIFACT} && dvc repro",
        )


def log_dataset(split: Split, dataset: str, context: str, path: Path, md5: str) -> None:
    """Record a split as an MLflow dataset whose digest is the md5 DVC records for its file.

    The source is the file's place in the user's repository (where `dvc checkout` or `dvc exp apply` puts it),
    not DVC's temporary copy; the profile gives the split's real shape."""
    with warnings.catch_warnings():
        # MLflow 3.17 registers its local-file source twice and warns that the path is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        logged = mlflow.data.from_numpy(
            # MLflow profiles the shape and dtype only: a stand-in of that shape reads no image (a mapped split
            # may not fit in memory).
            features=np.broadcast_to(np.zeros((), np.uint8), tuple(split.images.shape)),
            targets=split.labels.numpy(),
            source=str(repo_root() / path),
            name=f"{dataset}-{context}",
            digest=md5[:16],
        )
    mlflow.log_input(logged, context=context)


def log_results(metrics: dict[str, float], artifacts: list[Path], folder: str | None = None) -> None:
    """Final metrics and files of a stage, into the active run."""
    mlflow.log_metrics(metrics)
    for path in artifacts:
        mlflow.log_artifact(str(path), artifact_path=folder)


def epoch_logger(run_id: str) -> Callable[[dict[str, float]], None]:
    """log_epoch, less the epochs `run_id` already holds: a continued run gets from the resumed training's
    replayed history only what the interrupted attempt had not logged. (An epoch trained again after the last
    checkpoint keeps its first values: on the CPU they are the same numbers.)"""
    done = run_states.logged_steps(run_id)

    def log(stats: dict[str, float]) -> None:
        if int(stats["epoch"]) not in done:
            log_epoch(stats)

    return log


def log_epoch(stats: dict[str, float]) -> None:
    """One epoch's numbers, queued: a 200-image folder trains 278 epochs of a tenth of a second, and a synchronous
    write each would add seconds. Ending the run (also after Ctrl-C) waits until the queue is written."""
    metrics = {k: v for k, v in stats.items() if k != "epoch"}
    mlflow.log_metrics(metrics, step=int(stats["epoch"]), synchronous=False)


def log_resolved(values: dict[str, Any]) -> None:
    """What the `auto` params became for this run (`resolved.batch_size`, ...): the run's params hold what
    params.yaml said; these say what training did. Notes are the lines the stage printed about them."""
    notes = values.pop("notes", ())
    mlflow.log_params({f"resolved.{key}": value for key, value in values.items()})
    if notes:
        mlflow.log_text("\n".join(notes) + "\n", "train/plan.txt")


def log_warm_start(report: dict[str, Any], resolved: str) -> None:
    """Where a warm-started run's first weights came from (warm_start.WarmStartReport.as_dict()): tags to
    filter runs by, and the full key report as a file. `init_from.resolved` pins what an alias pointed at when
    the run started (aliases move)."""
    tags = {
        "init_from": report["source"],
        "init_from.resolved": resolved or report["source"],
        "init_from.sha256": report["sha256"],
    }
    tags.update(
        {
            f"init_from.{name}": str(len(report[name]))
            for name in ("matched", "missing", "unexpected", "skipped")
        }
    )
    mlflow.set_tags(tags)
    mlflow.log_dict(report, "train/warm_start.json")


def log_pretrained(weights: Any) -> None:
    """Which pretrained weights a timm model started from (backbones.Weights): what train.pretrained resolved
    to, the file read and its sha256, so a run can be traced to the exact bytes."""
    mlflow.set_tags(
        {
            "pretrained.source": weights.source,
            "pretrained.file": str(weights.file),
            "pretrained.sha256": weights.sha256,  # the file's own, also when its names were converted
            "pretrained.layout": weights.layout,
        }
    )


def write_run_file(path: Path, run_id: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(json.dumps({"run_id": run_id}, indent=2) + "\n")


def read_run_id(path: Path) -> str:
    try:
        return json.loads(Path(path).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(
            f"{path} is missing or damaged (it names the training's MLflow run); run the train stage again "
            "(dvc repro), or get it back with dvc checkout"
        ) from None


@contextmanager
def resume_run(run_file: Path, stage: str) -> Iterator[str]:
    """Reopen the training run named in `run_file` for `stage`, which ends it FINISHED, or FAILED or KILLED
    with the cause in tag `stage.<stage>` (a failed evaluate or export marks the run). If this store lacks the
    run (outputs pulled from a teammate without their MLflow server), open a new run tagged with the missing id
    rather than lose the results."""
    run_id = read_run_id(run_file)
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        print(f"warning: MLflow run {run_id} is not in this store; logging to a new run", file=sys.stderr)
        opened = mlflow.start_run(run_name=run_name() or None, tags={"trained_in_run": run_id})
    else:
        opened = mlflow.start_run(run_id=run_id)
    with opened as run, run_states.ended_honestly(stage, quick_requests):
        yield run.info.run_id
