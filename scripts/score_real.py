"""The metrics' floor: score N real Fashion-MNIST training images as if they were samples.

    python scripts/score_real.py [--n 1000] [--out outputs/real_train]

Every number the embedded model reaches should be read against this: a perfect generator of N images scores about
this much against the test split, not zero.
"""

import argparse
import json

import torch

from diffguide.store.checkpoint import asset_path
from diffguide.data import fashion_mnist
from diffguide.metrics.fmnist import FashionMNISTMetrics
from diffguide.store.samples import SampleStore


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--out", default="outputs/real_train")
    args = parser.parse_args()
    images, labels = fashion_mnist.load("train")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:args.n]
    store = SampleStore(args.out)
    store.claim({"real": "fashion-mnist train", "n": args.n})
    for i, j in enumerate(chosen.tolist()):
        store.write(i, images[j].permute(1, 2, 0).numpy(), {"seed": j, "label": int(labels[j]), "nfe": 0})
    scores = FashionMNISTMetrics(asset_path("fmnist_evaluator.safetensors"))(
        store.dir, labels[chosen].tolist(), torch.device("cpu"))
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
