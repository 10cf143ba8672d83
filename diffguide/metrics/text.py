"""Text-to-image metrics: how well each sample matches its prompt, per sample, with the bootstrap intervals and paired
differences the class metrics have (diffguide/metrics/intervals.py: each is a mean of one number per sample).

- `clip_score`: 100 cos(CLIP image embedding, CLIP text embedding), torchmetrics' CLIPScore
  (torchmetrics/functional/multimodal/clip_score.py, `_clip_score_update`: `score = 100 * (source_features *
  target_features).sum(axis=-1)`, averaged, then `torch.max(score / n, 0)`) kept per sample: the mean is
  torchmetrics' value wherever that is positive. Long prompts are cut to the text model's length with the end token
  kept (the tokenizer's truncation, as CLIP's own `clip.tokenize(truncate=True)` does); torchmetrics slices the ids
  instead and loses the end token the text model pools at.
- `pick_score`: PickScore (Kirstain et al. 2023; yuvalkirstain/PickScore_v1 through transformers, the model card's
  snippet: `scores = model.logit_scale.exp() * (text_embs @ image_embs.T)` of normalised embeddings), per sample.

Weights by path or hub id (`metric.clip_model`, `metric.pickscore_model`, `metric.pickscore_processor`); every one
is loaded in `check`, before sampling, so a missing one is one line before any work. The images are read back from
the sample files (the metrics know nothing of how they were made); FID against a reference set for text models is
the `inception` metric's (metric=inception metric.reference=FOLDER_OR_NPZ).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffguide.errors import UserError
from diffguide.metrics import intervals
from diffguide.metrics.base import Metric
from diffguide.models import hub
from diffguide.store.samples import sample_path


class _Scorer:
    """A CLIP-like model and its processor, embedding images and texts as the metric's source does."""

    def __init__(self, source: str, processor_source: str | None, key: str):
        from transformers import AutoModel, AutoProcessor

        from diffguide.models.text import quiet_diffusers

        with quiet_diffusers():
            self.model = hub.from_pretrained(AutoModel, source, key, None,
                                            what="a CLIP model").eval().requires_grad_(False)
            self.processor = hub.from_pretrained(AutoProcessor, processor_source or source,
                                                 key if processor_source is None else key.replace("model", "processor"),
                                                 None, what="a CLIP processor")
        config = getattr(self.model.config, "text_config", self.model.config)
        self.max_tokens = int(getattr(config, "max_position_embeddings", 77))

    @torch.no_grad()
    def embed(self, images: list[torch.Tensor], texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.to(device)
        pixels = self.processor(images=[i.cpu() for i in images], return_tensors="pt")["pixel_values"]
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_tokens)
        image = _features(self.model.get_image_features(pixel_values=pixels.to(device)))
        text = _features(self.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                       attention_mask=tokens["attention_mask"].to(device)))
        return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features where 4.x returned the tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


class TextMetrics(Metric):
    def __init__(self, clip_model: str | None = None, pickscore_model: str | None = None,
                 pickscore_processor: str | None = None, batch_size: int = 64, bootstrap: int = 1000):
        self.clip_model, self.pickscore_model = clip_model, pickscore_model
        self.pickscore_processor = pickscore_processor
        self.batch_size, self.bootstrap = batch_size, bootstrap
        self.scorers: dict[str, _Scorer] = {}

    def check(self, num_samples):
        for name in ("batch_size", "bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "batch_size" else 0):
                raise UserError(f"metric.{name}={value!r}: use a whole number >= {1 if name == 'batch_size' else 0}")
        if self.clip_model is None and self.pickscore_model is None:
            raise UserError("metric=text scores with a CLIP model: set metric.clip_model=PATH_OR_HUB_ID "
                            "(openai/clip-vit-large-patch14) and/or metric.pickscore_model=... "
                            "(yuvalkirstain/PickScore_v1)")
        if self.clip_model is not None and "clip_score" not in self.scorers:
            self.scorers["clip_score"] = _Scorer(str(self.clip_model), None, "metric.clip_model")
        if self.pickscore_model is not None and "pick_score" not in self.scorers:
            self.scorers["pick_score"] = _Scorer(str(self.pickscore_model), self.pickscore_processor,
                                                 "metric.pickscore_model")

    def per_sample(self, images: list[torch.Tensor], prompts: list[str], device) -> dict[str, np.ndarray]:
        out = {}
        for name, scorer in self.scorers.items():
            values = []
            for start in range(0, len(images), self.batch_size):
                image, text = scorer.embed(images[start:start + self.batch_size],
                                           prompts[start:start + self.batch_size], device)
                cos = (image * text).sum(-1)
                scale = 100.0 if name == "clip_score" else float(scorer.model.logit_scale.exp())
                values.append((scale * cos).double().cpu().numpy())
            out[name] = np.concatenate(values)
        return out

    def __call__(self, samples_dir, labels, device, stats_path: Path | None = None, prompts=None):
        if prompts is None:
            raise UserError("metric=text scores images against their prompts: use it with a text-to-image model")
        self.check(len(labels))
        images = [torch.from_numpy(np.array(Image.open(sample_path(samples_dir, i)).convert("RGB"))).permute(2, 0, 1)
                  for i in range(len(labels))]
        values = self.per_sample(images, list(prompts), device)
        scores = {name: float(v.mean()) for name, v in values.items()}
        stats = intervals.PointStats(labels=np.asarray(labels), **values)
        if self.bootstrap and len(labels) >= 2:
            for name, (low, high) in intervals.intervals(stats, scores, self.bootstrap).items():
                scores[f"{name}_lo"], scores[f"{name}_hi"] = low, high
            scores["bootstrap_replicates"] = self.bootstrap
        if stats_path is not None:
            stats.save(stats_path)
        return scores
