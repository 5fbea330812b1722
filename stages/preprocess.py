"""Stage 2: decode the raw files into uint8 tensors, carve off a stratified validation split, save them."""

from image_classifier import params as params_module
from image_classifier.errors import run_cli


def main() -> None:
    params = params_module.load()
    # Heavy imports (torch, MLflow) only once params are valid: a typo fails in a fraction of a second.
    from image_classifier.data import decode, preprocess
    from image_classifier.datasets import get_dataset
    from image_classifier.paths import META_FILE, RAW_DIR, SAMPLES_PNG, SPLIT_FILES

    if params.data.dataset == "folder":
        from image_classifier.folder import decode_folder

        classes, decoded = decode_folder(RAW_DIR, params.data.image_size, params.data.channels)
    else:
        spec = get_dataset(params.data.dataset)
        classes, decoded = list(spec.classes), decode(RAW_DIR, spec)
    preprocess(params.data.dataset, classes, decoded, params.preprocess, SPLIT_FILES, META_FILE, SAMPLES_PNG)


if __name__ == "__main__":
    run_cli(main)
