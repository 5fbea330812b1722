"""The MLflow connection: where runs go (store), what traces a run to its code and data (provenance), what a run
records (runs), and how models are registered (registry).

Callers use `tracking.<name>` for all of it; the names below are the package's whole interface.
"""

from image_classifier.tracking.provenance import dvc_md5, source_tags, uncommitted_diff
from image_classifier.tracking.registry import (
    CANDIDATE,
    CHAMPION,
    WEIGHTS_ARTIFACT,
    download_registered_weights,
    log_and_register_model,
    model_name,
    registered_name,
)
from image_classifier.tracking.runs import (
    DIFF_ARTIFACT,
    epoch_logger,
    log_dataset,
    log_epoch,
    log_pretrained,
    log_resolved,
    log_results,
    log_warm_start,
    read_run_id,
    resume_run,
    run_name,
    start_run,
    write_run_file,
)
from image_classifier.tracking.store import (
    STORE_DIR,
    connect,
    display_uri,
    quick_requests,
    repo_root,
    tracking_uri,
)

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "DIFF_ARTIFACT",
    "STORE_DIR",
    "WEIGHTS_ARTIFACT",
    "connect",
    "display_uri",
    "download_registered_weights",
    "dvc_md5",
    "epoch_logger",
    "log_and_register_model",
    "log_dataset",
    "log_epoch",
    "log_pretrained",
    "log_resolved",
    "log_results",
    "log_warm_start",
    "model_name",
    "quick_requests",
    "read_run_id",
    "registered_name",
    "repo_root",
    "resume_run",
    "run_name",
    "source_tags",
    "start_run",
    "tracking_uri",
    "uncommitted_diff",
    "write_run_file",
]
