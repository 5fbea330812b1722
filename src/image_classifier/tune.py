"""`tune`: an Optuna study over tune.yaml's search space, each trial an MLflow child run, the winner a DVC
experiment.

    tune --trials 20                      # TPE sampler; trials that fall behind are pruned epoch by epoch
    tune --trials 20 --study lr-search    # a named study: run it again to add trials (it resumes)
    tune --trials 10 --storage postgresql+psycopg://user@host/optuna    # many processes or machines, one study
    tune --apply-best                     # run the best trial as `dvc exp run -S ...`

Every trial trains with the library's own loop on the processed data of the current `dvc repro` (read once, no
copy per trial), so the printed `dvc exp run` command reproduces the best trial: on a CPU, bit for bit.
"""

import argparse
import shlex
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from image_classifier import params as params_module
from image_classifier import paths
from image_classifier.errors import UserError, one_line, run_cli

# A trial is pruned when its validation accuracy falls below the median of earlier trials at the same epoch,
# once two trials have finished, from its second epoch on (Optuna's MedianPruner; its defaults, 5 trials and
# no warm-up, would prune nothing in a short study and judge trials on their noisiest epoch).
PRUNER_STARTUP_TRIALS = 2
PRUNER_WARMUP_EPOCHS = 2
PARENT_RUN_ATTR = "mlflow_parent_run_id"
CLAIM_ATTR = "mlflow_parent_claim"
CLAIM_SECONDS = 2.0
STORAGE_ATTEMPTS = 4


def best_command(values: dict[str, Any]) -> str:
    """The `dvc exp run` that trains the best trial's params as a tracked experiment. Floats are written in full
    (repr), so the experiment trains with exactly the trial's values."""
    settings = [
        f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}" for key, value in values.items()
    ]
    return "dvc exp run " + " ".join(f"-S {shlex.quote(setting)}" for setting in settings)


def open_study(name: str, storage: str | None, seed: int | None) -> Any:
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if storage is None:
        paths.TUNE_STORAGE.parent.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{paths.TUNE_STORAGE}"
    # SQLite: wait for the other process's write instead of failing on a locked database.
    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    store = None
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            store = optuna.storages.RDBStorage(
                storage, engine_kwargs=engine, heartbeat_interval=60, grace_period=120
            )
            break
        except Exception as error:  # a bad URL, a server that is not there, a missing driver
            # Processes that start together on an empty database race to create Optuna's tables: the loser sees
            # "already exists" (or a second row for the schema version: SQLite's UNIQUE constraint, PostgreSQL's
            # duplicate key), and the tables are there when it tries again.
            lost_race = any(
                text in str(error) for text in ("already exists", "UNIQUE constraint", "duplicate key")
            )
            if lost_race and attempt + 1 < STORAGE_ATTEMPTS:
                time.sleep(1 + attempt)
                continue
            raise UserError(
                f"cannot open the study storage {storage}: {one_line(error, limit=200)}"
            ) from None
    return optuna.create_study(
        study_name=name,
        storage=store,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS
        ),
    )


def run(args: argparse.Namespace) -> None:
    base_params = params_module.load()
    from image_classifier.search_space import load_space

    base = yaml_params()
    space = load_space(Path(args.space), base)  # a bad file fails here, before torch, MLflow or Optuna load
    study = open_study(args.study, args.storage, args.seed)
    if args.apply_best:
        apply_best(study)
        return

    import mlflow

    from image_classifier import tracking
    from image_classifier.tune_trial import Trials

    tracking.connect(base_params.tracking)
    # Trials removes its scratch folder (the trials' checkpoints) however the study ends.
    with (
        Trials(base, space, args.study) as trials,
        mlflow.start_run(
            run_id=parent_run(study, args.study, Path(args.space), base_params.tracking.experiment)
        ),
    ):
        started, status = time.perf_counter(), "FAILED"
        try:
            study.optimize(trials.objective, n_trials=args.trials, timeout=args.timeout, gc_after_trial=True)
            status = "FINISHED"
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the same command resumes the study
            status = "KILLED"
            raise
        finally:
            trials.report_study(study, time.perf_counter() - started)
            mlflow.end_run(status)  # `with` alone would end an interrupted run FAILED
    print(f"best trial {study.best_trial.number}: validation accuracy {study.best_value:.4f}")
    print(best_command(study.best_trial.params))


def parent_run(study: Any, name: str, space: Path, experiment_name: str) -> str:
    """The study's MLflow parent run, made by the first `tune` process and found by every later one.

    Processes that start at once must agree on one: each writes a random claim into the study's storage, waits
    CLAIM_SECONDS for the others' writes, and the claim read back (the last one written) says who makes the run;
    the rest wait for its id (and make it themselves if the claimant stopped first). Two processes whose claims are more than CLAIM_SECONDS apart never race: the later
    one finds the claim before writing its own."""
    import mlflow

    def make_parent() -> None:
        client = mlflow.MlflowClient()
        experiment = mlflow.get_experiment_by_name(experiment_name).experiment_id
        run = client.create_run(experiment, run_name=f"tune {name}", tags={"tune.study": name})
        client.log_text(run.info.run_id, space.read_text(), "tune/space.yaml")
        study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)

    if PARENT_RUN_ATTR not in study.user_attrs and CLAIM_ATTR not in study.user_attrs:
        mine = uuid.uuid4().hex
        study.set_user_attr(CLAIM_ATTR, mine)
        time.sleep(CLAIM_SECONDS)
        if study.user_attrs[CLAIM_ATTR] == mine:
            make_parent()
    deadline = time.monotonic() + 30
    while PARENT_RUN_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:  # the claimant stopped before making the run: make it here
            make_parent()
        time.sleep(0.5)
    return study.user_attrs[PARENT_RUN_ATTR]


def apply_best(study: Any) -> None:
    command = best_command(study.best_trial.params)
    print(command)
    subprocess.run(shlex.split(command), check=True)


def yaml_params() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(params_module.PARAMS_FILE.read_text())


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trials", type=int, default=None, help="trials this process runs (default: until --timeout)"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="stop starting trials after this many seconds"
    )
    parser.add_argument("--study", default="default", help="the study's name: the same name resumes it")
    parser.add_argument(
        "--storage", default=None, help=f"an Optuna storage URL (default: sqlite:///{paths.TUNE_STORAGE})"
    )
    parser.add_argument(
        "--space", default=str(paths.TUNE_SPACE), help=f"the search space (default: {paths.TUNE_SPACE})"
    )
    parser.add_argument("--seed", type=int, default=None, help="the sampler's seed (default: random)")
    parser.add_argument("--apply-best", action="store_true", help="run the best trial as a DVC experiment")
    args = parser.parse_args()
    if args.trials is None and args.timeout is None and not args.apply_best:
        parser.error("give --trials, --timeout or both")
    run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(cli())
