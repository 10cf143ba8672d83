"""Metrics in the feature space of this project's Fashion-MNIST evaluator, against a Fashion-MNIST split, plus class
accuracy."""

from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

from diffguide import checkpoint
from diffguide.data import fashion_mnist
from diffguide.errors import UserError
from diffguide.metrics.base import FidelityMetric
from diffguide.networks import evaluator as evaluator_lib
from diffguide.samples import sample_path


class EvaluatorFeatures(FeatureExtractorBase):
    """The Fashion-MNIST evaluator as a torch-fidelity feature extractor: 'features' (penultimate) and 'logits'."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.model = evaluator_lib.load(feature_extractor_weights_path)

    def forward(self, x):
        # torch-fidelity hands over uint8 RGB (grayscale PNGs are expanded): the evaluator reads one channel.
        features, logits = self.model.features_and_logits(x[:, :1].to(next(self.model.parameters()).device))
        out = {"features": features.float(), "logits": logits.float()}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)


class _FashionMNISTImages(torch.utils.data.Dataset):
    def __init__(self, split):
        self.images = fashion_mnist.load(split)[0]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].expand(3, -1, -1)


class FashionMNISTMetrics(FidelityMetric):
    """Metrics in the feature space of this project's Fashion-MNIST evaluator, against a Fashion-MNIST split."""

    def __init__(self, evaluator: str, reference: str = "test", class_accuracy: bool = True, **kwargs):
        super().__init__(suffix="_fmnist", **kwargs)
        self.evaluator_path, self.reference, self.class_accuracy = evaluator, reference, class_accuracy

    def check(self, num_samples):
        if self.reference_file is None and str(self.reference) not in fashion_mnist.SPLITS:
            raise UserError(f"metric.reference={self.reference!r} is not a Fashion-MNIST reference: use "
                            f"{', '.join(fashion_mnist.SPLITS)}, or the path of an .npz reference batch (ADM format)")
        if not isinstance(self.class_accuracy, bool):
            raise UserError(f"metric.class_accuracy={self.class_accuracy!r}: use true or false")
        super().check(num_samples)
        evaluator_lib.load(self.evaluator_path)
        if self.reference_file is None:
            fashion_mnist.check_available(self.reference)

    def fidelity_kwargs(self):
        # The weights' digest is in the extractor's name, so retrained weights are a different extractor (in the
        # feature cache's key and file name too).
        name = f"fmnist-evaluator-{checkpoint.file_digest(self.evaluator_path)}"
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(name, EvaluatorFeatures)
        if self.reference_file is not None:
            return {"feature_extractor": name, "feature_extractor_weights_path": self.evaluator_path}
        dataset = f"fmnist-{self.reference}"
        if dataset not in DATASETS_REGISTRY:
            torch_fidelity.register_dataset(dataset, lambda root, download, split=self.reference:
                                            _FashionMNISTImages(split))
        return {"feature_extractor": name, "feature_extractor_weights_path": self.evaluator_path, "input2": dataset}

    def score(self, samples_dir, labels, device):
        scores, stats = super().score(samples_dir, labels, device)
        if self.class_accuracy:
            stats.correct = correct_labels(evaluator_lib.load(self.evaluator_path).to(device), samples_dir, labels,
                                           device)
            scores["class_accuracy"] = float(stats.correct.mean())
        return scores, stats


@torch.no_grad()
def correct_labels(model, samples_dir: Path, labels: list[int], device, batch_size: int = 500) -> np.ndarray:
    """For each sample, whether the evaluator assigns it to the class it was generated for (class accuracy is their
    share)."""
    correct = []
    for start in range(0, len(labels), batch_size):
        chunk = range(start, min(start + batch_size, len(labels)))
        images = np.stack([np.array(Image.open(sample_path(samples_dir, i)).convert("L")) for i in chunk])
        logits = model(torch.from_numpy(images)[:, None].to(device))
        correct.append((logits.argmax(1).cpu() == torch.tensor([labels[i] for i in chunk])).numpy())
    return np.concatenate(correct)

