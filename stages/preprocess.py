"""Stage 2: decode the raw files into uint8 images, carve off a stratified validation split, store the splits as
shards (see storage.py; a folder data set: folder_preprocess.py)."""

from pathlib import Path

from image_classifier import params as params_module
from image_classifier.errors import run_cli


def main() -> None:
    params = params_module.load()
    # Heavy imports (torch, MLflow) only once params are valid: a typo fails in a fraction of a second.
    from image_classifier.backbones import check_architecture, is_timm
    from image_classifier.datasets import get_dataset
    from image_classifier.paths import META_FILE, PROCESSED_DIR, RAW_DIR, SAMPLES_PNG, SPLIT_DIRS
    from image_classifier.preprocess import preprocess
    from image_classifier.raw_formats import decode

    if is_timm(params.train.model):  # its name decides the image size: check it before decoding anything
        check_architecture(params.train.model)
    if params.data.dataset == "folder":
        # Splits drawn from the file list, each image decoded straight into its final shard (no scratch copy).
        from image_classifier.folder import auto_note, resolve_image_size
        from image_classifier.folder_preprocess import preprocess_folder

        size = resolve_image_size(params.data.image_size, params.train.model, RAW_DIR)
        preprocess_folder(
            RAW_DIR,
            size,
            params.data.channels,
            params.preprocess,
            SPLIT_DIRS,
            META_FILE,
            SAMPLES_PNG,
            lambda images: auto_note(
                params.data.image_size, params.data.channels, images, params.train.model
            ),
        )
    else:  # a built-in data set has its own image shape: data.image_size and data.channels are not used
        spec = get_dataset(params.data.dataset)
        classes, decoded = list(spec.classes), decode(RAW_DIR, spec)
        preprocess(
            params.data.dataset, list(classes), decoded, params.preprocess, SPLIT_DIRS, META_FILE, SAMPLES_PNG
        )
    _remove_old_scratch(PROCESSED_DIR)


def _remove_old_scratch(processed: Path) -> None:
    """The scratch file earlier versions decoded a folder into, if a killed run of one left it."""
    import shutil

    shutil.rmtree(processed.with_name(f".{processed.name}.scratch"), ignore_errors=True)


if __name__ == "__main__":
    run_cli(main)
