"""Metrics in the feature space of this project's Fashion-MNIST evaluator, against a Fashion-MNIST split, plus class
accuracy."""

from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY

from diffguide.store import checkpoint
from diffguide.data import fashion_mnist
from diffguide.errors import UserError
from diffguide.metrics.base import FidelityMetric
from diffguide.classifiers import evaluator as evaluator_lib
from diffguide.store.samples import sample_path


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

    def __init__(self, evaluator: str, reference: str = "test", class_accuracy: bool = True,
                 diffusion_classifier: dict | None = None, **kwargs):
        super().__init__(suffix="_fmnist", **kwargs)
        self.evaluator_path, self.reference, self.class_accuracy = evaluator, reference, class_accuracy
        # null: off; else {model, n_samples, to_keep, seed, batch_size}: class_accuracy_diffusion (see
        # diffusion_correct_labels), the samples judged by the generator's own network
        self.diffusion_classifier = diffusion_classifier

    def check(self, num_samples):
        if self.reference_file is None and str(self.reference) not in fashion_mnist.SPLITS:
            raise UserError(f"metric.reference={self.reference!r} is not a Fashion-MNIST reference: use "
                            f"{', '.join(fashion_mnist.SPLITS)}, or the path of an .npz reference batch (ADM format)")
        if not isinstance(self.class_accuracy, bool):
            raise UserError(f"metric.class_accuracy={self.class_accuracy!r}: use true or false")
        if self.diffusion_classifier is not None:
            self._diffusion_settings()
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
        if self.diffusion_classifier is not None:
            correct = diffusion_correct_labels(samples_dir, labels, device, **self._diffusion_settings())
            scores["class_accuracy_diffusion"] = float(correct.mean())
            from diffguide.metrics.intervals import wilson

            low, high = wilson(int(correct.sum()), len(correct))
            scores["class_accuracy_diffusion_lo"], scores["class_accuracy_diffusion_hi"] = low, high
        return scores, stats

    def _diffusion_settings(self) -> dict:
        """metric.diffusion_classifier checked: {model (a Denoiser), n_samples, to_keep, seed, batch_size}."""
        from diffguide.classifiers import diffusion

        node = self.diffusion_classifier
        key = "metric.diffusion_classifier"
        if not hasattr(node, "keys"):
            raise UserError(f"{key}={node!r}: use null, or a node with model: ${{model}}, n_samples, to_keep")
        allowed = {"model", "n_samples", "to_keep", "seed", "batch_size"}
        unknown = sorted(set(node.keys()) - allowed)
        if unknown:
            raise UserError(f"{key}.{unknown[0]} is not a key; its keys are: {', '.join(sorted(allowed))}")
        model = node.get("model")
        if hasattr(model, "keys") and "_target_" in model:  # a config node not instantiated yet
            from diffguide.errors import instantiate

            model = self.diffusion_classifier["model"] = instantiate(model)
        if not hasattr(model, "predict"):
            raise UserError(f"{key}.model must be the model (model: ${{model}}), got {type(model).__name__}")
        settings = {"model": model, "n_samples": list(node.get("n_samples", [50, 500])),
                    "to_keep": list(node.get("to_keep", [5, 1])), "seed": node.get("seed", 0),
                    "batch_size": node.get("batch_size", 50)}
        for name in ("seed", "batch_size"):
            value = settings[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
                raise UserError(f"{key}.{name}={value!r}: use a whole number >= {0 if name == 'seed' else 1}")
        T = diffusion.require_discrete(model)
        if tuple(model.sample_shape) != (1, 28, 28):
            raise UserError(f"{key}.model makes {'x'.join(map(str, model.sample_shape))} samples; the metric scores "
                            f"1x28x28 Fashion-MNIST images")
        diffusion.check_stages(settings["n_samples"], settings["to_keep"], model.num_classes, T)
        return settings


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


def _read_samples(samples_dir: Path, chunk) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.array(Image.open(sample_path(samples_dir, i)).convert("L")) for i in chunk]))


def diffusion_correct_labels(samples_dir: Path, labels: list[int], device, model, n_samples, to_keep, seed: int = 0,
                             batch_size: int = 50) -> np.ndarray:
    """For each sample (its PNG, as the evaluator reads it), whether the Diffusion Classifier of `model` (Li et al.
    2023; diffguide/classifiers/diffusion.py) assigns it to the class it was generated for. Costs, per sample,
    num_classes * n_samples[0] + sum_i to_keep[i] * (new pairs of stage i + 1) network evaluations."""
    from diffguide.classifiers import diffusion
    from diffguide.data.fashion_mnist import to_model_range

    model = model.to(device).eval()
    correct = []
    for start in range(0, len(labels), batch_size):
        chunk = range(start, min(start + batch_size, len(labels)))
        x0 = to_model_range(_read_samples(samples_dir, chunk)[:, None]).to(device)
        found = diffusion.classify(model, x0, n_samples, to_keep, seed=seed, batch=len(chunk) * model.num_classes)
        correct.append((found.predictions.cpu() == torch.tensor([labels[i] for i in chunk])).numpy())
    return np.concatenate(correct)

