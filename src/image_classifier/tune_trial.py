"""One `tune` trial: its params, a training run with the library's loop, an MLflow child run, pruning by epoch."""

import math
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
import optuna
import torch
import torch.nn.functional as F

from image_classifier import params as params_module
from image_classifier import paths, tracking
from image_classifier.data import Meta, Split, load_split
from image_classifier.device import configure_host, pick_device
from image_classifier.errors import UserError
from image_classifier.models import model_config
from image_classifier.search_space import Dimension, suggest, with_values
from image_classifier.train import train


class Trials:
    """The objective Optuna calls: the processed splits are read once and every trial trains on them.

    A context manager: the scratch folder of the trials' checkpoints goes when the study ends, is interrupted or
    fails (a checkpoint is only useful while its trial runs: Optuna never resumes a trial)."""

    def __init__(self, base: dict[str, Any], space: dict[str, Dimension], study: str) -> None:
        self.base, self.space, self.study = base, space, study
        params = params_module.from_dict(base)
        self.meta = Meta.load(paths.META_FILE)
        if "data.image_size" in space and self.meta.dataset != "folder":
            raise UserError(f"data.image_size cannot vary: {self.meta.dataset} keeps its own image size")
        self.splits = {
            "train": load_split(paths.SPLIT_DIRS["train"]),
            "val": load_split(paths.SPLIT_DIRS["val"]),
        }
        configure_host(params.train.threads, 1)
        self.device = pick_device(params.train.device)
        self.scratch = Path(tempfile.mkdtemp(prefix="tune-"))

    def __enter__(self) -> "Trials":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def objective(self, trial: optuna.Trial) -> float:
        values = suggest(trial, self.space)
        params = params_module.from_dict(with_values(self.base, values))
        train_split, val_split = (
            self._resized(self.splits[name], values.get("data.image_size")) for name in ("train", "val")
        )
        shape = list(train_split.images.shape[1:])
        config, pretrained = model_config(
            params.train, self.meta.dataset, shape, self.meta.classes, self.meta.mean, self.meta.std
        )
        tags = {"tune.study": self.study, "tune.trial": str(trial.number)}
        mlflow.start_run(nested=True, run_name=f"trial {trial.number}", tags=tags)
        mlflow.log_params(params.flat())
        started = time.perf_counter()

        def report(stats: dict[str, float]) -> None:
            tracking.log_epoch(stats)
            trial.report(stats["val_accuracy"], int(stats["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {int(stats['epoch'])}")

        status, state = "FAILED", "FAIL"
        checkpoint = self.scratch / f"trial-{trial.number}.pt"
        try:
            result = train(
                params.train,
                config,
                train_split,
                val_split,
                self.device,
                checkpoint,
                on_epoch=report,
                pretrained=pretrained,
            )
            status, state = "FINISHED", "COMPLETE"
        except optuna.TrialPruned:
            status, state = "KILLED", "PRUNED"
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            checkpoint.unlink(missing_ok=True)  # a long study would otherwise keep one per trial
            mlflow.set_tag("tune.state", state)
            mlflow.log_metric("trial_seconds", time.perf_counter() - started)
            mlflow.end_run(status)
        return result.best_val_accuracy

    def _resized(self, split: Split, size: int | None) -> Split:
        """The split at `size` pixels (antialiased), when the search varies data.image_size."""
        if size is None or size == split.images.shape[-1]:
            return split
        images = F.interpolate(
            split.in_memory().images.float(), size=(size, size), mode="bilinear", antialias=True
        )
        return Split(images.round().clamp(0, 255).to(torch.uint8), split.labels)

    def report_study(self, study: optuna.Study, seconds: float) -> None:
        """On the parent run: the best trial, the counts by state, and Optuna's history and importance plots."""
        states = [trial.state.name for trial in study.trials]
        mlflow.log_metrics({f"trials_{name.lower()}": states.count(name) for name in set(states)})
        mlflow.log_metric("tune_seconds", seconds)
        completed = [trial for trial in study.trials if trial.state.name == "COMPLETE"]
        if not completed:
            return
        best = study.best_trial
        mlflow.log_metric("best_val_accuracy", best.value if best.value is not None else math.nan)
        mlflow.set_tags(
            {"tune.best_trial": str(best.number), **{f"best.{k}": str(v) for k, v in best.params.items()}}
        )
        from optuna.visualization import matplotlib as plots

        mlflow.log_figure(plots.plot_optimization_history(study).figure, "tune/history.png")
        if len(completed) >= 2 and len(self.space) >= 2:
            mlflow.log_figure(plots.plot_param_importances(study).figure, "tune/importance.png")
