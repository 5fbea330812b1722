"""Stage 2: decode the raw files into uint8 images, carve off a stratified validation split, store the splits as
shards (see storage.py)."""

from image_classifier import params as params_module
from image_classifier.errors import run_cli


def main() -> None:
    params = params_module.load()
    # Heavy imports (torch, MLflow) only once params are valid: a typo fails in a fraction of a second.
    from image_classifier.backbones import check_architecture, is_timm
    from image_classifier.data import decode, preprocess
    from image_classifier.datasets import get_dataset
    from image_classifier.paths import META_FILE, PROCESSED_DIR, RAW_DIR, SAMPLES_PNG, SPLIT_DIRS
    from image_classifier.storage import scratch_folder

    if is_timm(params.train.model):  # its name decides the image size: check it before decoding anything
        check_architecture(params.train.model)
    # A folder's images are decoded onto disk here first (memory stays bounded), then split and stored.
    with scratch_folder(PROCESSED_DIR) as scratch:
        note = ""
        if params.data.dataset == "folder":
            from image_classifier.folder import auto_note, decode_folder_to, resolve_image_size

            size = resolve_image_size(params.data.image_size, params.train.model, RAW_DIR)
            classes, decoded = decode_folder_to(RAW_DIR, size, params.data.channels, scratch)
            note = auto_note(
                params.data.image_size, params.data.channels, decoded["train"].images, params.train.model
            )
        else:  # a built-in data set has its own image shape: data.image_size and data.channels are not used
            spec = get_dataset(params.data.dataset)
            classes, decoded = list(spec.classes), decode(RAW_DIR, spec)
        preprocess(
            params.data.dataset, classes, decoded, params.preprocess, SPLIT_DIRS, META_FILE, SAMPLES_PNG, note
        )


if __name__ == "__main__":
    run_cli(main)
