"""Download pretrained weights into the cache, on a machine with internet, so training can run without it.

    python scripts/fetch_pretrained.py timm:resnet18 timm:convnext_nano     # each architecture's published weights
    python scripts/fetch_pretrained.py timm:resnet18 --weights hf-hub:timm/resnet18.a1_in1k

The cache is $IMAGE_CLASSIFIER_CACHE (default ~/.cache/image-classifier): copy that folder to the same place on
the machine without internet (or point IMAGE_CLASSIFIER_CACHE at the copy) and set HF_HUB_OFFLINE=1 there.
"""

import argparse

from image_classifier import backbones, paths
from image_classifier.errors import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="timm:<architecture>, as train.model names it")
    parser.add_argument(
        "--weights", default="default", help="what train.pretrained will say (default: default)"
    )
    args = parser.parse_args()
    for model in args.models:
        model = model if backbones.is_timm(model) else f"{backbones.PREFIX}{model}"
        backbones.check_architecture(model)
        weights = backbones.resolve_weights(args.weights, model)
        print(f"{model}: {weights.line()}")
    print(f"cache: {paths.pretrained_cache()}")


if __name__ == "__main__":
    run_cli(main)
