"""Text conditions: what a text-to-image family does with a run's prompts, written once for every family.

The condition a sampler and a guidance method hold is, for every model, an int64 index per sample into the family's
table of conditions: a class for a class-conditional model, a prompt of the run's set here. Guidance methods combine
predictions under such indices (the conditional one, the null one, a random other one for ICG) and never look
inside them; the family turns the indices of one forward into what its network takes (token embeddings, attention
masks, pooled embeddings, SDXL's added time ids, ...) at the moment of the forward, so that several conditions still
go through the network as one batch, as class labels do.

Indices 0..P-1 are the P prompts of the set; P.. are the distinct negative prompts, the first of them the family's
null condition (the empty prompt as its pipeline encodes it, or SDXL's zeros): `null_labels` maps each prompt to its
own negative. Encodings are made on first use, a batch of distinct strings per encoder call, and kept (a bounded
cache: COCO-30k's 30k SDXL encodings would take 9 GB).
"""

from collections import OrderedDict
from contextlib import contextmanager

import torch

from diffguide.data.prompts import PromptSet
from diffguide.errors import UserError

#: encodings kept (each a dict of per-prompt tensors): a few batches' worth of distinct prompts
CACHE_SIZE = 2048


@contextmanager
def quiet_diffusers():
    """diffusers' and transformers' loggers warn once per truncated prompt, on stderr; the family says it once."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before[0])
        transformers_logging.set_verbosity(before[1])


class TextConditioned:
    """The mixin of every text-to-image Denoiser (listed before Denoiser in its bases). A family sets
    `self.prompt_set` through `set_prompts` and implements `encode(strings) -> dict of (n, ...) tensors`,
    `null_encoding(like)` (the encoding of "no negative prompt") and `_network(x, t, condition)`; `token_limits()`
    names its tokenizers' limits for the truncation warning."""

    conditioning = "text"

    def set_prompts(self, prompt_set: PromptSet) -> None:
        self.prompt_set = prompt_set
        negatives = [None] + sorted({n for n in prompt_set.negatives if n is not None})
        self._strings = list(prompt_set.prompts) + negatives
        first_negative = len(prompt_set)
        self._negative_of = torch.tensor([first_negative + negatives.index(n) for n in prompt_set.negatives] +
                                         list(range(first_negative, len(self._strings))), dtype=torch.long)
        self.num_classes = len(prompt_set)
        self.null_class = first_negative
        self._cache: OrderedDict[int, dict] = OrderedDict()
        #: warnings for the user, said by the entry point once every check has passed (an error stays one line)
        self.notices: list[str] = []
        self._warn_truncated()

    def _warn_truncated(self) -> None:
        strings = [s for s in self._strings if s is not None]
        for name, tokenizer, limit in self.token_limits():
            with quiet_diffusers():
                lengths = [len(ids) for ids in tokenizer(strings, truncation=False).input_ids]
            over = sum(length > limit for length in lengths)
            if over:
                self.notices.append(f"{over} of {len(strings)} prompts are longer than {name}'s {limit} tokens and "
                                    f"are truncated to them, as the pipeline does")

    def token_limits(self) -> list[tuple[str, object, int]]:
        """(name, tokenizer, tokens it keeps) of each text encoder's tokenizer."""
        return []

    def null_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Each prompt's own negative prompt (the null condition where it has none); a null index stays itself."""
        return self._negative_of.to(labels.device)[labels]

    def prompt_of(self, index: int) -> tuple[str, str | None]:
        return self.prompt_set.prompts[index], self.prompt_set.negatives[index]

    def conditions(self, labels: torch.Tensor) -> dict:
        """The network inputs of the conditions `labels` (batch,), stacked along the batch."""
        ids = labels.tolist()
        missing = sorted({i for i in ids if i not in self._cache})
        if missing:
            strings = [self._strings[i] for i in missing if self._strings[i] is not None]
            with torch.no_grad(), quiet_diffusers():
                encoded = self.encode(strings) if strings else None
                row = 0
                for i in missing:
                    if self._strings[i] is None:
                        one = self.null_encoding()
                    else:
                        one = {k: v[row:row + 1] for k, v in encoded.items()}
                        row += 1
                    self._cache[i] = one
        for i in set(ids):
            self._cache.move_to_end(i)
        while len(self._cache) > max(CACHE_SIZE, len(set(ids))):
            self._cache.popitem(last=False)
        keys = self._cache[ids[0]].keys()
        return {k: torch.cat([self._cache[i][k] for i in ids]) for k in keys}

    def _output(self, x, t, labels):
        if labels is None:
            raise UserError(f"{type(self).__name__} is text-conditioned: it has no prediction without a condition")
        return self._network(x, t, self.conditions(labels))

    def encode(self, strings: list[str]) -> dict:
        raise NotImplementedError

    def null_encoding(self) -> dict:
        """The encoding of "no negative prompt": by default the empty prompt's, as the pipelines encode it."""
        return self.encode([""])

    def _network(self, x, t, condition: dict):
        raise NotImplementedError


def is_text(denoiser) -> bool:
    return getattr(denoiser, "conditioning", "class") == "text"
