"""A small scoring case: 40 Fashion-MNIST test images as samples and a 120-image .npz reference (ADM format), so
that a test can score (and cache reference features) in about a second."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffguide.data import fashion_mnist
from diffguide.metrics.fmnist import FashionMNISTMetrics
from diffguide.store.samples import sample_path


@dataclass
class Small:
    samples: Path
    labels: list[int]
    reference: Path
    evaluator: Path

    def metric(self, cache_root, **kwargs) -> FashionMNISTMetrics:
        settings = dict(reference=str(self.reference), isc_splits=2, kid_subset_size=20, cache_root=str(cache_root),
                        class_accuracy=False)
        return FashionMNISTMetrics(str(self.evaluator), **{**settings, **kwargs})

    def score(self, cache_root, **kwargs) -> dict[str, float]:
        return self.metric(cache_root, **kwargs)(self.samples, self.labels, torch.device("cpu"))


def write_samples(folder: Path, images: torch.Tensor) -> Path:
    """PNGs named as SampleStore names them (000000.png, ...), which is all the metrics read."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(sample_path(folder, i))
    return folder


@pytest.fixture(scope="session")
def small(tmp_path_factory, tiny_evaluator_path) -> Small:
    root = tmp_path_factory.mktemp("small")
    images, labels = fashion_mnist.load("test")
    samples = write_samples(root / "samples", images[:40])
    reference = root / "reference.npz"
    np.savez(reference, arr_0=images[1000:1120].permute(0, 2, 3, 1).expand(-1, -1, -1, 3).numpy())
    return Small(samples, labels[:40].tolist(), reference, tiny_evaluator_path)
