"""How far the conditional and unconditional predictions agree along a trajectory: the number Adaptive Guidance's
gamma is compared with, in the paper's eps space and in x0 space, and the L2 norm of x0_c - x0_u, the difference
APG clips to its threshold r; per step (10th, 50th and 90th percentile over samples), on the embedded model with CFG
at w = 2 and DDIM. Ends with the number of steps whose median norm exceeds r.

    python scripts/adaptive_cosines.py [--n 64] [--steps 25] [--r 1.64]
"""

import argparse

import torch

from diffguide.store.checkpoint import asset_path
from diffguide.guidance.cfg import CFG
from diffguide.models import unet
from diffguide.samplers.ddim import DDIM
from diffguide.store.samples import initial_noise, labels_for


class Probe(CFG):
    """CFG that records the per-sample cosines of its two predictions before combining them."""

    def __init__(self, scale):
        super().__init__(scale)
        self.rows = []

    def __call__(self, denoiser, x, t, labels):
        eps_u, eps_c = denoiser.eps_many(x, t, [denoiser.null_labels(labels), labels])
        q = torch.tensor([0.1, 0.5, 0.9])
        cos = torch.nn.functional.cosine_similarity
        eps_cos = cos(eps_c.flatten(1), eps_u.flatten(1), dim=1)
        x0_c, x0_u = denoiser.x0_from_eps(x, t, eps_c).flatten(1), denoiser.x0_from_eps(x, t, eps_u).flatten(1)
        x0_cos = cos(x0_c, x0_u, dim=1)
        norm = (x0_c - x0_u).norm(dim=1)
        self.rows.append((t, eps_cos.quantile(q).tolist(), x0_cos.quantile(q).tolist(), norm.quantile(q).tolist()))
        return super().__call__(denoiser, x, t, labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--r", type=float, default=1.64, help="APG's norm threshold")
    args = parser.parse_args()
    model = unet.load(asset_path("fmnist_unet.safetensors"))
    model.set_precision(torch.bfloat16)
    indices = list(range(args.n))
    x_T, _ = initial_noise(indices, 0, model.sample_shape, torch.device("cpu"))
    probe = Probe(2.0)
    with torch.no_grad():
        DDIM(args.steps).sample(model, probe, x_T, labels_for(indices, model.num_classes))
    print("| step | t | cos(eps_c, eps_u) p10 / p50 / p90 | cos(x0_c, x0_u) p10 / p50 / p90 "
          "| norm(x0_c - x0_u) p10 / p50 / p90 |")
    print("| --- | --- | --- | --- | --- |")
    for step, (t, eps_q, x0_q, norm_q) in enumerate(probe.rows, 1):
        print(f"| {step} | {t} | {' / '.join(f'{v:.4f}' for v in eps_q)} | {' / '.join(f'{v:.4f}' for v in x0_q)} "
              f"| {' / '.join(f'{v:.2f}' for v in norm_q)} |")
    clipped = sum(norm_q[1] > args.r for *_, norm_q in probe.rows)
    print(f"\nAPG's r = {args.r:g}: the median norm exceeds it on {clipped} of {len(probe.rows)} steps")


if __name__ == "__main__":
    main()
