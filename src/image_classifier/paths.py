"""Where every stage reads and writes, relative to the repository root (DVC runs stages there).

dvc.yaml names the same paths; tests/test_dvc_yaml.py checks that the two agree.
"""

import os
from pathlib import Path

RAW_DIR = Path("data/raw")
PROCESSED_DIR = Path("data/processed")
# Each split is a folder of image shards and a label file (storage.py).
SPLIT_DIRS = {split: PROCESSED_DIR / split for split in ("train", "val", "test")}
META_FILE = PROCESSED_DIR / "meta.json"
SAMPLES_PNG = Path("reports/preprocess/samples.png")

# Resumable training state lives outside DVC's outputs (see train stage); deleted once training completes.
RESUME_DIR = Path("data/resume")
MODEL_FILE = Path("models/model.pt")
CHECKPOINT_FILE = Path("models/checkpoint.pt")
TRAIN_HISTORY = Path("reports/train/history.csv")
TRAIN_METRICS = Path("reports/train/metrics.json")
TRAIN_CURVES_PNG = Path("reports/train/curves.png")
RUN_FILE = Path("reports/train/mlflow_run.json")

EVAL_METRICS = Path("reports/evaluate/metrics.json")
PREDICTIONS_CSV = Path("reports/evaluate/predictions.csv")
CONFUSION_PNG = Path("reports/evaluate/confusion.png")
MISCLASSIFIED_PNG = Path("reports/evaluate/misclassified.png")
RELIABILITY_PNG = Path("reports/evaluate/reliability.png")
TEST_LOGITS = Path("reports/evaluate/test_logits.npz")

EXPORT_DIR = Path("models/export")
WEIGHTS_FILE = EXPORT_DIR / "weights.pt"
MODEL_CONFIG = EXPORT_DIR / "config.json"
ONNX_FILE = EXPORT_DIR / "model.onnx"
PT2_FILE = EXPORT_DIR / "model.pt2"
EXPORT_METRICS = Path("reports/export/metrics.json")

TUNE_SPACE = Path("tune.yaml")  # `tune`'s search space
TUNE_STORAGE = Path("mlruns/optuna.db")  # its default study storage: beside the MLflow store, not in git


def pretrained_cache() -> Path:
    """Where downloaded pretrained weights are kept (timm models): $IMAGE_CLASSIFIER_CACHE, else
    ~/.cache/image-classifier (or under $XDG_CACHE_HOME). Outside the repository, so every clone shares it;
    copy the folder to a machine without internet to use the same weights there."""
    if os.environ.get("IMAGE_CLASSIFIER_CACHE"):
        return Path(os.environ["IMAGE_CLASSIFIER_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "image-classifier"
