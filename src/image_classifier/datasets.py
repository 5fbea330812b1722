"""The data sets the pipeline knows: where their files come from and how to check them.

Adding a data set (MNIST, KMNIST, CIFAR-10, ...) means adding an entry to DATASETS, nothing else.
"""

from dataclasses import dataclass

from image_classifier.errors import UserError


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set. `name`, `sha256` and `size` describe the DECOMPRESSED bytes,
    so a file is checked the same way whether it arrived gzipped or plain."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: its files by role (train_images, train_labels, test_images, test_labels),
    the mirrors that serve `<mirror>/<file name>.gz`, its class names and (channels, height, width)."""

    name: str
    format: str
    files: dict[str, RemoteFile]
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        format="idx",
        files={
            "train_images": RemoteFile(
                "train-images-idx3-ubyte",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                47040016,
            ),
            "train_labels": RemoteFile(
                "train-labels-idx1-ubyte",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                60008,
            ),
            "test_images": RemoteFile(
                "t10k-images-idx3-ubyte",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                7840016,
            ),
            "test_labels": RemoteFile(
                "t10k-labels-idx1-ubyte",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                10008,
            ),
        },
        mirrors=(
            "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
        ),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        image_shape=(1, 28, 28),
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    """The spec of data set `name`; a UserError listing the known names if there is none."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise UserError(f"unknown data set {name!r}; known data sets: {known}") from None
