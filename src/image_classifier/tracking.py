"""The MLflow connection: where runs go, what a run records, and how models are registered.

Train opens one run; evaluate and export reopen it by the id train wrote to a small DVC-tracked file, so one
row in the MLflow UI holds train, validation and test metrics and every exported file.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import urllib.parse
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from image_classifier import run_states
from image_classifier.data import Split
from image_classifier.errors import UserError, one_line
from image_classifier.files import atomic_path, file_digest
from image_classifier.params import Params, TrackingParams

STORE_DIR = "mlruns"
CANDIDATE, CHAMPION = "candidate", "champion"
# Files DVC rewrites while a pipeline runs: their changes say nothing about the code or params of a run.
NOT_SOURCE = ("dvc.lock",)
DIFF_ARTIFACT = "source/uncommitted.diff"
# The plain state dict inside every registered model, so a warm start downloads just the weights and loads them
# with weights_only=True (the pt2 program beside it is not a state dict).
WEIGHTS_ARTIFACT = "extra_files/weights.pt"
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


def model_name(params: TrackingParams, dataset: str, data_path: str = "") -> str:
    """The registered model's name: tracking.model_name, else `<dataset>-classifier`. A folder of your own images
    (a CSV: the folder it sits in) names it, `<folder>-classifier`: two folders' models in one store must not
    become versions of one model, competing for its champion alias."""
    if params.model_name:
        return params.model_name
    if dataset == "folder" and data_path:
        path = Path(data_path)
        folder = path.parent if path.suffix.lower() == ".csv" else path
        # Lower case, and nothing that a models:/<name>@alias URI or a shell would read as syntax.
        dataset = re.sub(r"[^a-z0-9._-]+", "-", folder.name.lower()).strip("-._") or dataset
    return f"{dataset}-classifier"


def registered_name(params: Params) -> str:
    """What the export stage registers under `params`, and what `make serve` serves."""
    return model_name(params.tracking, params.data.dataset, params.data.path)


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


def run_name() -> str:
    """The DVC experiment's name under `dvc exp run`, else one MLflow makes up (readable, e.g. 'bold-owl-42')."""
    return os.environ.get("DVC_EXP_NAME") or ""


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _source_pathspec() -> list[str]:
    return ["--", ".", *(f":(exclude){name}" for name in NOT_SOURCE)]


def uncommitted_diff() -> str:
    """`git diff HEAD` of tracked files, less the files DVC itself rewrites: what makes a tree dirty."""
    return _git("diff", "HEAD", "--no-color", "--no-ext-diff", *_source_pathspec())


def dvc_md5(path: Path) -> str:
    """The md5 DVC records for a file or a folder in dvc.lock, so a tag points at the exact cached object. A
    folder's is DVC's: the md5 of the JSON list of its files' md5s and paths, sorted by path, plus ".dir"."""
    path = Path(path)
    if not path.is_dir():
        return file_digest(path, "md5")
    files = sorted(file for file in path.rglob("*") if file.is_file())
    entries = [
        {"md5": file_digest(file, "md5"), "relpath": file.relative_to(path).as_posix()} for file in files
    ]
    listing = json.dumps(sorted(entries, key=lambda entry: entry["relpath"]), sort_keys=True)
    return hashlib.md5(listing.encode(), usedforsecurity=False).hexdigest() + ".dir"


def source_tags(data_files: dict[str, Path], device: str) -> dict[str, str]:
    """Tags that trace a run to its code, data and machine, and say how to get its outputs back.

    `git.dirty` ignores dvc.lock, which `dvc repro` rewrites as it goes. `reproduce` for a DVC experiment is
    `dvc exp apply` (the experiment's commit holds its params, code and outputs); for a plain `dvc repro` it
    is a checkout of the commit and `dvc repro` (outputs come back from DVC's run cache where it has them);
    a dirty tree's changes are logged with the run (see `start_run`)."""
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", *_source_pathspec()))
    experiment = os.environ.get("DVC_EXP_NAME")
    checkout = f"git checkout {commit} && " if commit else ""
    reproduce = checkout + (f"dvc exp apply {experiment}" if experiment else "dvc repro")
    tags = {
        "git.commit": commit or "unknown",
        "git.dirty": str(dirty).lower(),
        "device": device,
        "torch.version": torch.__version__,
        "reproduce": reproduce,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    tags.update({f"data.{name}.md5": dvc_md5(path) for name, path in data_files.items()})
    if experiment:
        tags["dvc.experiment"] = experiment
        if os.environ.get("DVC_EXP_BASELINE_REV"):
            tags["dvc.baseline"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


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
            diff = uncommitted_diff()
            if diff:
                mlflow.log_text(diff + "\n", DIFF_ARTIFACT)
                commit = tags.get("git.commit", "HEAD")
                mlflow.set_tag(
                    "reproduce",
                    f"git checkout {commit} && mlflow artifacts download -r {run.info.run_id} "
                    f"-a {DIFF_ARTIFACT} -d . && git apply {DIFF_ARTIFACT} && dvc repro",
                )
        yield run.info.run_id


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


def _pip_requirements() -> list[str]:
    """What the logged model needs to load: the PyTorch and NumPy this run used (MLflow adds itself)."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def _model_metadata(config: dict[str, Any]) -> dict[str, Any]:
    metadata = {key: config[key] for key in ("dataset", "classes", "image_shape") if key in config}
    if "classes" in metadata:
        metadata["outputs"] = (
            "logits, one per class in the order of `classes`, temperature-scaled: their softmax gives calibrated "
            "probabilities; inputs are float32 in 0..1"
        )
    return metadata


def log_and_register_model(
    model: torch.nn.Module,
    example: torch.Tensor,
    registered_name: str,
    test_accuracy: float,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Log the model into the active run (MLflow 3 API), register a new version, alias it `candidate`, and
    move `champion` to it only if its test accuracy beats the current champion's; the decision is recorded on
    the version (tag `decision` and its description). Returns the name, version, decision and whether it won.

    The model's MLmodel metadata gets the class names and input shape from `config`: the served model answers
    with one logit per class, and whoever loads it (`mlflow.models.get_model_info(uri).metadata`) needs to know
    which class each one is."""
    model = model.cpu().eval()  # pt2 loading keeps the mode it was saved in
    example = example.detach().cpu().float()
    if example.shape[0] < 2:
        raise ValueError("the input example needs a batch of at least 2, or the saved model's batch is fixed")
    with torch.no_grad():
        output = model(example).numpy()
    example_np = example.numpy()
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / Path(WEIGHTS_ARTIFACT).name
        torch.save(model.state_dict(), weights)
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=mlflow.models.infer_signature(example_np, output),
            input_example=example_np,
            pip_requirements=_pip_requirements(),
            registered_model_name=registered_name,
            metadata=_model_metadata(config or {}),
            extra_files=[str(weights)],  # MLflow puts them under extra_files/: WEIGHTS_ARTIFACT
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    client.set_model_version_tag(registered_name, version, "test_accuracy", f"{test_accuracy:.6f}")
    try:
        champion = client.get_model_version_by_alias(registered_name, CHAMPION)
        champion_accuracy = float(champion.tags.get("test_accuracy", "-1"))
    except MlflowException:
        champion, champion_accuracy = None, -1.0
    client.set_registered_model_alias(registered_name, CANDIDATE, version)
    promoted = test_accuracy > champion_accuracy
    if promoted:
        client.set_registered_model_alias(registered_name, CHAMPION, version)
        decision = f"champion: test accuracy {test_accuracy:.4f} beats " + (
            f"version {champion.version} ({champion_accuracy:.4f})" if champion else "no earlier champion"
        )
    else:
        decision = (
            f"candidate only: test accuracy {test_accuracy:.4f} does not beat champion version "
            f"{champion.version} ({champion_accuracy:.4f})"
        )
    client.set_model_version_tag(registered_name, version, "decision", decision)
    client.update_model_version(registered_name, version, description=decision)
    mlflow.set_tag("model.decision", f"{registered_name} version {version}: {decision}")
    return {"name": registered_name, "version": version, "promoted": promoted, "decision": decision}


def download_registered_weights(uri: str, params: TrackingParams, folder: Path) -> tuple[Path, str]:
    """The weights file of the registered model version `models:/<name>@<alias>` or `models:/<name>/<version>`
    names, downloaded into `folder`; returns its path and "<name> version <n>" (an alias moves: the number says
    which one was used). Every failure is one line naming the cause."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", uri)
    if not match:
        raise UserError(
            f"train.init_from = {uri!r}: write models:/<name>@<alias> or models:/<name>/<version>"
        )
    name, alias, version = match.groups()
    store = tracking_uri(params)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    client = MlflowClient()
    try:
        with quick_requests():
            try:
                registered = client.get_registered_model(name)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                known = [model.name for model in client.search_registered_models(max_results=20)]
                raise UserError(
                    f"train.init_from: no registered model '{name}' in {store}; "
                    f"known: {', '.join(known) or 'none'}"
                ) from None
            if alias:
                if alias not in registered.aliases:
                    aliases = ", ".join(f"@{a}" for a in sorted(registered.aliases)) or "none"
                    raise UserError(
                        f"train.init_from: model '{name}' has no alias '{alias}'; its aliases: {aliases}"
                    )
                version = str(registered.aliases[alias])
            else:
                versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
                if int(version) not in versions:
                    raise UserError(
                        f"train.init_from: model '{name}' has no version {version}; "
                        f"its versions: {', '.join(map(str, versions)) or 'none'}"
                    )
    except (MlflowException, OSError) as error:
        raise UserError(
            f"train.init_from: cannot use the MLflow store {store} ({request_failure(error)})"
        ) from None
    try:
        path = mlflow.artifacts.download_artifacts(
            f"models:/{name}/{version}/{WEIGHTS_ARTIFACT}", dst_path=str(folder)
        )
    except (MlflowException, OSError):
        raise UserError(
            f"train.init_from: {name} version {version} has no {WEIGHTS_ARTIFACT} (registered before warm starts "
            "existed); run the export stage again to register a version that has it"
        ) from None
    return Path(path), f"{name} version {version}"
