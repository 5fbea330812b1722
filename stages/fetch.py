"""Stage 1: get the data set's original files into data/raw, verified against pinned checksums."""

from pathlib import Path

from image_classifier import params as params_module
from image_classifier.errors import run_cli
from image_classifier.paths import RAW_DIR


def main() -> None:
    params = params_module.load()
    if params.data.dataset == "folder":
        from image_classifier.folder import copy_image_folder

        copy_image_folder(Path(params.data.path), RAW_DIR)
        return
    from image_classifier.datasets import get_dataset
    from image_classifier.fetch import fetch_dataset, local_folders

    spec = get_dataset(params.data.dataset)
    local_dirs = local_folders(params.fetch.local_dirs, spec.name)
    fetch_dataset(spec, RAW_DIR, local_dirs, params.fetch.mirrors, params.fetch.timeout_s)


if __name__ == "__main__":
    run_cli(main)
