"""CFG++'s guidance, read as CFG's: the effective CFG weight of each CFG++ DDIM step.

One CFG++ DDIM step is a CFG step at w_t = lambda sigma / (sigma - sigma_next) (diffguide/samplers/effective_scale.py
works it out). Prints w_t at every step of the embedded model's DDIM trajectory for each lambda, their
median, the number of steps below w = 1 (weaker than the conditional model), and the lambda whose median w_t equals
each CFG weight asked for, so that CFG++ and CFG can be compared at matched effective guidance.

    python scripts/cfgpp_effective_scale.py [--steps 25] [--lambdas 0.2,0.25,0.3,0.35,0.4,0.6] [--match 1.25,1.5,2]
"""

import argparse
import statistics

from diffguide.store.checkpoint import asset_path
from diffguide.models import unet
from diffguide.samplers.effective_scale import effective_weights, matching_lambda


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--lambdas", default="0.2,0.25,0.3,0.35,0.4,0.6")
    parser.add_argument("--match", default="1.25,1.5,2")
    args = parser.parse_args()
    model = unet.load(asset_path("fmnist_unet.safetensors"))
    lambdas = [float(v) for v in args.lambdas.split(",")]
    columns = {lam: effective_weights(model, args.steps, lam) for lam in lambdas}
    print("| step | t | sigma | " + " | ".join(f"w_t at lambda {lam:g}" for lam in lambdas) + " |")
    print("| --- | --- | --- | " + " --- |" * len(lambdas))
    for i, (t, _) in enumerate(columns[lambdas[0]]):
        cells = " | ".join(f"{columns[lam][i][1]:.2f}" for lam in lambdas)
        print(f"| {i + 1} | {t} | {model.sigma(t):.3f} | {cells} |")
    print()
    for lam in lambdas:
        weights = [w for _, w in columns[lam]]
        print(f"lambda {lam:g}: median w_t {statistics.median(weights):.2f}, "
              f"{sum(w < 1 for w in weights)} of {len(weights)} steps below w = 1")
    for target in (float(v) for v in args.match.split(",")):
        print(f"CFG w = {target:g} <-> CFG++ lambda {matching_lambda(model, args.steps, target):.3f} (median w_t)")


if __name__ == "__main__":
    main()
