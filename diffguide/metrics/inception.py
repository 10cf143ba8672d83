"""Metrics in torch-fidelity's own feature extractors (Inception-v3, DINOv2), for RGB models."""

import os
import sys
from contextlib import redirect_stdout
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch_fidelity.registry import DATASETS_REGISTRY, FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import glob_samples_paths

from diffguide.errors import UserError
from diffguide.metrics.base import FidelityMetric


class InceptionMetrics(FidelityMetric):
    """torch-fidelity's Inception-v3 (`inception-v3-compat`) for RGB models, or another of its extractors
    (`feature_extractor=dinov2-vit-l-14`: the Frechet distance in DINOv2 features that recent papers report as
    FD_DINOv2, named `fid_dinov2` here; DINOv2 has no class logits, so no IS).

    weights: a local copy of the extractor's weights file, for clusters without internet (None: torch-fidelity
    downloads). reference: a dataset registered in torch-fidelity (e.g. `cifar10-train`), a folder of reference
    images, or an .npz reference batch (ADM's format: images `arr_0` and/or statistics `mu`, `sigma`).
    """

    def __init__(self, reference: str, weights: str | None = None, feature_extractor: str = "inception-v3-compat",
                 **kwargs):
        dinov2 = feature_extractor.startswith("dinov2")
        super().__init__(suffix="_dinov2" if dinov2 else "", **kwargs)
        if dinov2:
            self.flags["isc"] = False
        self.reference, self.weights, self.feature_extractor = reference, weights, feature_extractor

    def check(self, num_samples):
        if self.feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise UserError(f"metric.feature_extractor={self.feature_extractor!r} is not one of torch-fidelity's "
                            f"({', '.join(FEATURE_EXTRACTORS_REGISTRY)})")
        if self.weights is not None and not Path(self.weights).is_file():
            raise UserError(f"feature extractor weights file not found: {self.weights} (metric.weights)")
        super().check(num_samples)
        if self.reference_file is None and str(self.reference) not in DATASETS_REGISTRY:
            if not Path(self.reference).is_dir():
                raise UserError(f"metric.reference={self.reference!r} is neither a torch-fidelity dataset "
                                f"({', '.join(sorted(DATASETS_REGISTRY))}), a folder of images, nor an .npz file")
            # torch-fidelity's own listing of the folder (png, jpg, jpeg; not its subfolders)
            count = len(glob_samples_paths(self.reference, False, "png,jpg,jpeg", verbose=False))
            if count < self._least_reference_images(False):
                raise UserError(f"metric.reference={self.reference}: the metrics turned on need at least "
                                f"{self._least_reference_images(False)} reference images (png, jpg or jpeg); "
                                f"the folder holds {count}")
        self._check_downloads()

    def _check_downloads(self) -> None:
        """What torch-fidelity would download while scoring (the extractor's weights, a built-in dataset) must be on
        disk, or its server reachable: else the run fails after sampling, with a download traceback."""
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        from diffguide.models.hub import reachable

        if self.weights is None:
            url = URL_INCEPTION_V3 if self.feature_extractor.startswith("inception") else "https://github.com"
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
            if not (url == URL_INCEPTION_V3 and cached.is_file()) and not reachable(url):
                raise UserError(f"metric.feature_extractor={self.feature_extractor} downloads its weights, and "
                                f"{urlparse(url).hostname} cannot be reached from here: download them where it can "
                                f"and set metric.weights=FILE")
        if self.reference_file is None and str(self.reference) in DATASETS_REGISTRY:
            root = os.path.join(torch.hub._get_torch_home(), "fidelity_datasets")  # torch-fidelity's default
            try:
                with redirect_stdout(sys.stderr):
                    DATASETS_REGISTRY[self.reference](root, False)
            except Exception:  # torchvision: "Dataset not found or corrupted" when it is not on disk
                if self.weights is not None or not reachable("https://www.cs.toronto.edu"):  # no download then
                    raise UserError(f"metric.reference={self.reference} is not in {root} and cannot be downloaded "
                                    f"here: use a folder of reference images or an .npz reference batch") from None

    def fidelity_kwargs(self):
        kwargs = {"feature_extractor": self.feature_extractor, "feature_extractor_weights_path": self.weights,
                  "datasets_download": self.weights is None}
        if self.reference_file is None:
            kwargs["input2"] = self.reference
        return kwargs
