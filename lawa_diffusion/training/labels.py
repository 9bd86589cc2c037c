"""Class labels of the training images, for a class-conditional UNet (``model.num_class_embeds``): Fashion-MNIST's
IDX label files, found next to its image files.
"""
from __future__ import annotations

import os

import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.evaluation.images import read_idx_labels

IMAGES_PART, LABELS_PART = "images-idx3-ubyte", "labels-idx1-ubyte"


def labels_file_of(images_path: str) -> str:
    """The label file next to a Fashion-MNIST image file (``train-images-idx3-ubyte.gz`` ->
    ``train-labels-idx1-ubyte.gz``)."""
    folder, name = os.path.split(images_path)
    path = os.path.join(folder, name.replace(IMAGES_PART, LABELS_PART))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Fashion-MNIST labels {path!r} are missing next to {images_path!r}; a "
                                "class-conditional model (model num_class_embeds) trains on them: put the label file "
                                "there")
    return path


def labelled_split(data, num_classes: int) -> str:
    """The Fashion-MNIST split of ``data`` (a ``DataConfig``): the only dataset that comes with class labels."""
    from lawa_diffusion.evaluation import images

    split = images.parse_dataset_name(data.dataset)
    check(split is not None, f"model num_class_embeds {num_classes} trains a class-conditional UNet, which needs class "
          f"labels; data dataset {data.dataset!r} has none: use fashion-mnist or fashion-mnist:test, or drop "
          "model num_class_embeds")
    return split


def load_training_labels(data, num_classes: int) -> torch.Tensor:
    """int64 [N] class labels of ``data`` (a ``DataConfig``), in the order of its images (``num_images`` kept)."""
    from lawa_diffusion.evaluation import images

    split = labelled_split(data, num_classes)
    labels = read_idx_labels(labels_file_of(images.fashion_mnist_file(split, data.root)))
    if data.num_images is not None:
        labels = labels[: data.num_images]
    check(int(labels.max()) < num_classes, f"model num_class_embeds must exceed the largest class label "
          f"{int(labels.max())} of {data.dataset!r}, got {num_classes}; set it to {int(labels.max()) + 1}")
    return labels
