"""Stage 2: decode the raw files into uint8 tensors, carve off a stratified validation split, save them."""

from image_classifier import params as params_module
from image_classifier.errors import run_cli


def main() -> None:
    params = params_module.load()
    # Heavy imports (torch, MLflow) only once params are valid: a typo fails in a fraction of a second.
    from image_classifier.backbones import check_architecture, is_timm
    from image_classifier.data import decode, preprocess
    from image_classifier.datasets import get_dataset
    from image_classifier.paths import META_FILE, RAW_DIR, SAMPLES_PNG, SPLIT_FILES

    if is_timm(params.train.model):  # its name decides the image size: check it before decoding anything
        check_architecture(params.train.model)
    note = ""
    if params.data.dataset == "folder":
        from image_classifier.folder import auto_note, decode_folder, resolve_image_size

        size = resolve_image_size(params.data.image_size, params.train.model)
        classes, decoded = decode_folder(RAW_DIR, size, params.data.channels)
        note = auto_note(params.data.image_size, params.data.channels, decoded["train"].images)
    else:  # a built-in data set has its own image shape: data.image_size and data.channels are not used
        spec = get_dataset(params.data.dataset)
        classes, decoded = list(spec.classes), decode(RAW_DIR, spec)
    preprocess(
        params.data.dataset, classes, decoded, params.preprocess, SPLIT_FILES, META_FILE, SAMPLES_PNG, note
    )


if __name__ == "__main__":
    run_cli(main)
