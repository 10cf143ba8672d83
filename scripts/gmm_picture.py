"""Where each guidance method puts its samples, on an exact 2-D Gaussian mixture (4 classes on a ring).

    python scripts/gmm_picture.py [--out outputs/gmm_methods.png] [--scale 3] [--steps 50] [--n 1000]

Every panel samples class 0 (the right-hand class) from the same initial noise with DDIM on the exact denoiser.
The conditional model reproduces the class; guidance pushes samples away from the other classes, and the methods
differ in how far and in what shape. Exact classifier guidance at s equals CFG at w = s (Bayes). Two panels read
differently in 2-D than on images: cfg_rescale's per-sample std over two coordinates is just |x1 - x2| / sqrt(2),
and adaptive guidance switches off at once because both predictions point at the origin at high noise.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffguide.classifiers.gmm import ExactMixtureClassifier, ExactMixtureCleanClassifier  # noqa: E402
from diffguide.guidance.adaptive import AdaptiveGuidance  # noqa: E402
from diffguide.guidance.apg import APG  # noqa: E402
from diffguide.guidance.autoguidance import AutoGuidance  # noqa: E402
from diffguide.guidance.cfg import CFG  # noqa: E402
from diffguide.guidance.cfg_interval import CFGInterval  # noqa: E402
from diffguide.guidance.cfg_rescale import CFGRescale  # noqa: E402
from diffguide.guidance.cfg_zero_star import CFGZeroStar  # noqa: E402
from diffguide.guidance.cfgpp import CFGPlusPlus  # noqa: E402
from diffguide.guidance.classifier import ClassifierGuidance  # noqa: E402
from diffguide.guidance.gfcg import GradientFreeClassifierGuidance  # noqa: E402
from diffguide.guidance.none import NoGuidance  # noqa: E402
from diffguide.guidance.offshelf import OffTheShelfGuidance  # noqa: E402
from diffguide.guidance.universal import UniversalGuidance  # noqa: E402
from diffguide.models import gmm  # noqa: E402
from diffguide.samplers.ddim import DDIM  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/gmm_methods.png")
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()

    model = gmm.ring(num_classes=4, radius=2.0, std=0.5)
    w = args.scale
    methods = {
        "conditional (none)": NoGuidance(),
        "unconditional": NoGuidance(conditional=False),
        f"cfg w={w:g}": CFG(w),
        "cfgpp lambda=0.6": CFGPlusPlus(0.6),
        f"cfg_rescale w={w:g}": CFGRescale(w),
        f"cfg_interval w={w:g}": CFGInterval(w),
        f"apg w={w:g}": APG(w, norm_threshold=0.0, momentum=0.0),
        f"adaptive w={w:g}": AdaptiveGuidance(w),
        f"cfg_zero_star w={w:g}": CFGZeroStar(w),
        f"classifier (exact) s={w:g}": ClassifierGuidance(ExactMixtureClassifier(model), w),
        # the weak model: the same ring, its components twice as wide (a model that has not learnt them sharply)
        f"autoguidance w={w:g}": AutoGuidance(gmm.ring(num_classes=4, radius=2.0, std=1.0), w),
        # clean-data gradients do not shrink with the noise: with 50 steps s = 1 throws samples far past the class
        # (its panel's mean says where they went, out of the frame)
        # (on the unconditional model, like the classifier panel: on the conditional one the exact p(y | x0) is
        # already near 1 and its gradient near 0)
        "offshelf (exact p(y|x0)) s=0.05": OffTheShelfGuidance(ExactMixtureCleanClassifier(model), 0.05,
                                                               conditional_model=False),
        "offshelf (exact p(y|x0)) s=1": OffTheShelfGuidance(ExactMixtureCleanClassifier(model), 1.0,
                                                            conditional_model=False),
        f"gfcg s={w:g} (base: cond.)": GradientFreeClassifierGuidance(ExactMixtureCleanClassifier(model), w,
                                                                     base="none"),
        "universal (TFG) s=1": UniversalGuidance(ExactMixtureCleanClassifier(model), 1.0),
    }
    x_T = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(args.n, dtype=torch.long)
    truth, truth_labels = model.sample_data(4000, torch.Generator().manual_seed(1))
    cols = 5
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), sharex=True, sharey=True)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax, (name, guidance) in zip(axes.flat, methods.items()):
        generators = [torch.Generator().manual_seed(10_000 + i) for i in range(args.n)]  # universal draws noise
        x, nfe = DDIM(args.steps, clip_x0=False).sample(model, guidance, x_T, labels, generators)
        nfe = float(nfe.mean()) if torch.is_tensor(nfe) else nfe
        ax.scatter(truth[:, 0], truth[:, 1], s=1, c=truth_labels, cmap="tab10", alpha=0.15, vmin=0, vmax=9)
        ax.scatter(x[:, 0], x[:, 1], s=2, c="black")
        ax.set_title(f"{name}\nNFE {nfe:g}, mean ({float(x[:, 0].mean()):.1f}, {float(x[:, 1].mean()):.1f})",
                     fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-4.5, 4.5)
        ax.set_ylim(-4.5, 4.5)
    fig.suptitle(f"class 0 (right) of a 4-class Gaussian ring, DDIM {args.steps} steps, exact denoiser; "
                 f"colours: the mixture's own samples", fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
