"""The Diffusion Classifier (Li et al. 2023; diffguide/classifiers/diffusion.py) against the official code
(diffusion-classifier/diffusion-classifier, eval_prob_adaptive.py) and the exact Gaussian mixture."""

import math

import numpy as np
import pytest
import torch

from diffguide.classifiers import diffusion
from diffguide.errors import UserError
from diffguide.models import gmm, unet as unet_lib


def _clean_log_posterior(model, x):
    ones = torch.ones(len(x), 1, dtype=torch.float64)
    return model.log_posterior_at(x, ones, 0 * ones)


def test_stratified_timesteps_are_the_official_formula():
    """eval_prob_adaptive.py, eval_prob_adaptive: `start = T // max_n_samples // 2; t_to_eval = list(range(start, T,
    T // max_n_samples))[:max_n_samples]` and per stage `t_to_eval[len(t_to_eval) // n_samples // 2::len(t_to_eval)
    // n_samples][:n_samples]`, less the timesteps already in `t_evaluated`."""
    T = 1000
    for m in (1, 7, 50, 300, 500, 1000):
        assert diffusion.stratified_timesteps(T, m) == list(range(T // m // 2, T, T // m))[:m]
    t_to_eval = list(range(1, 1000, 2))  # --n_samples 50 500
    first, second = diffusion.stage_plan(T, [50, 500])
    assert first == t_to_eval[5::10][:50] == list(range(11, 1000, 20))
    assert len(second) == 450 and not set(first) & set(second) and set(first) | set(second) == set(t_to_eval)
    timesteps, noises = diffusion.pairs(gmm.image(), 25, seed=3)
    assert timesteps == diffusion.stratified_timesteps(T, 25) and noises.shape == (25, 1, 8, 8)
    assert torch.equal(noises, diffusion.pairs(gmm.image(), 25, seed=3)[1])  # fixed by the seed


def test_one_pair_error_is_the_mixture_closed_form():
    """Sec. 3 of the paper: the score is ||eps - eps_theta(x_t, c)||^2 with x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    (official loss 'l2': F.mse_loss(noise, noise_pred, reduction='none').mean(dim=(1, 2, 3))). On the mixture
    (gmm.py docstring) eps_theta(x, k) = E[eps | x, k] = noise (x - alpha mu_k) / v, v = alpha^2 s^2 + noise^2:
    computed here by hand for one (t, eps)."""
    model = gmm.image(num_classes=3, shape=(1, 4, 4), std=0.2)
    x0, _ = model.sample_data(5, torch.Generator().manual_seed(1))
    x0 = x0.double()
    t, eps = 400, torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = float(model.alphas_cumprod[t])
    alpha, noise = math.sqrt(a), math.sqrt(1 - a)
    v = alpha ** 2 * 0.2 ** 2 + noise ** 2
    x_t = alpha * x0 + noise * eps[0]
    by_hand = torch.stack([(eps[0] - noise * (x_t - alpha * model.means[k]) / v).pow(2).mean((1, 2, 3))
                           for k in range(3)], 1)
    got = diffusion.class_errors(model, x0, [0, 1, 2], [t], eps, batch=4)  # 15 rows in chunks of 4
    torch.testing.assert_close(got, by_hand, rtol=1e-10, atol=1e-12)


def test_scores_rank_classes_as_the_exact_posterior():
    """The paper's posterior (Sec. 3): p(c | x) = exp(-E||eps - eps_theta(x_t, c)||^2) / sum_k exp(-E||...||^2).
    On the mixture E_eps of the error is const_t + w_t ||x0 - mu_k||^2 for every t, and log p(k | x0) =
    -||x0 - mu_k||^2 / (2 s^2) + const: with enough shared pairs (500, the official second stage's count) the
    classes rank alike by -score and by the exact clean posterior (argmin score = argmax posterior, and the whole
    ranking)."""
    model = gmm.image(num_classes=5, shape=(1, 4, 4), std=0.2, seed=0)
    g = torch.Generator().manual_seed(0)
    x0 = (model.means + 0.1 * torch.randn(model.means.shape, generator=g, dtype=torch.float64)).float()
    timesteps, noises = diffusion.pairs(model, 500, seed=0)  # 200 pairs still swap two near-tied classes
    scores = diffusion.class_errors(model, x0, range(5), timesteps, noises)
    exact = _clean_log_posterior(model, x0)
    assert torch.equal(scores.argmin(1), exact.argmax(1))
    assert torch.equal(scores.argmin(1), torch.arange(5))
    assert torch.equal(scores.argsort(1), (-exact).argsort(1))


def _counting(model):
    """Wrap model._output_at: the (image, class) rows of every forward."""
    rows = []
    network = model._output_at

    def counted(x, level, labels):
        rows.append((level.t, labels.clone()))
        return network(x, level, labels)

    model._output_at = counted
    return rows


def test_adaptive_stage_evaluates_only_the_kept_classes_on_new_pairs():
    """eval_prob_adaptive.py: stage i evaluates `remaining_prmpt_idxs` on `curr_t_to_eval` without `t_evaluated`,
    then keeps `torch.topk(torch.tensor(errors), k=n_to_keep)` of the mean error over all its pairs: with
    `--to_keep 3 1 --n_samples 4 12` on C classes that is C * 4 + 3 * 8 evaluations per image, and a class pruned at
    stage 1 is never evaluated again."""
    model = gmm.image(num_classes=6, shape=(1, 4, 4), std=0.3, seed=1)
    x0, _ = model.sample_data(4, torch.Generator().manual_seed(0))
    rows = _counting(model)
    found = diffusion.classify(model, x0, [4, 12], [3, 1], seed=0)
    first, second = diffusion.stage_plan(1000, [4, 12])
    assert found.nfe == 6 * 4 + 3 * 8 and found.pairs == 12
    assert sum(len(labels) for _, labels in rows) == len(x0) * found.nfe
    stage1 = [labels.view(4, -1) for t, labels in rows if t in first]
    stage2 = [labels.view(4, -1) for t, labels in rows if t in second]
    assert len(stage1) == 4 and len(stage2) == 8
    assert all(torch.equal(s, torch.arange(6).expand(4, -1)) for s in stage1)
    # the classes kept after stage 1: the 3 lowest mean errors over the stage-1 pairs, computed independently
    timesteps, noises = first + second, diffusion.fixed_noises((1, 4, 4), 12, 0)
    model._output_at = type(model)._output_at.__get__(model)
    stage1_mean = diffusion.class_errors(model, x0, range(6), first, noises[:4])
    kept = stage1_mean.topk(3, dim=1, largest=False).indices.sort(1).values
    for labels in stage2:
        assert torch.equal(labels.sort(1).values, kept)
    # the final score of a kept class: its mean over all 12 pairs; pruned classes inf; prediction its argmin
    full = diffusion.class_errors(model, x0, range(6), timesteps, noises).double()
    finite = torch.isfinite(found.scores)
    assert int(finite.sum()) == len(x0)
    torch.testing.assert_close(found.scores[finite], full[finite], rtol=1e-6, atol=1e-9)
    assert torch.equal(found.predictions, found.scores.argmin(1))


def test_stage_settings_are_refused_in_one_line():
    for n_samples, to_keep, match in (([5, 10], [2], "one entry per stage"), ([10, 5], [2, 1], "must increase"),
                                      ([5, 10], [1, 1], "must decrease"), ([5, 10], [3, 2], "end with 1"),
                                      ([5, 10], [11, 1], "more classes"), ([5, 2000], [2, 1], "at most 1000"),
                                      ([0], [1], "whole number >= 1")):
        with pytest.raises(UserError, match=match) as info:
            diffusion.check_stages(n_samples, to_keep, 10, 1000)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="discrete-time"):
        diffusion.pairs(gmm.ring(family="flow"), 4)


def test_logits_gradient_matches_a_finite_difference():
    """DiffusionClassifier.logits = -mean_j sum_pixels (eps_j - eps_theta(x_t_j, t_j, c))^2 (the log of the paper's
    posterior up to a constant): the gradient flows through the denoiser, and equals a central difference (the
    mixture's conditional eps is linear in x, so the logit is quadratic: the difference is exact to rounding)."""
    model = gmm.image(num_classes=3, shape=(1, 4, 4), std=0.2)
    classifier = diffusion.DiffusionClassifier(model, n_pairs=6, seed=0).attach(model)
    x0 = model.sample_data(2, torch.Generator().manual_seed(4))[0].double().requires_grad_(True)
    logits = classifier.logits(x0)
    timesteps, noises = diffusion.pairs(model, 6, seed=0)
    torch.testing.assert_close(logits, -16 * diffusion.class_errors(model, x0, range(3), timesteps, noises))
    assert torch.equal(logits, classifier.logits(x0))  # fixed pairs: deterministic
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), x0)
    assert grad.abs().sum() > 0
    h, direction = 1e-4, torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        diff = (classifier.logits(x0 + h * direction)[:, 1] - classifier.logits(x0 - h * direction)[:, 1]) / (2 * h)
    torch.testing.assert_close((grad * direction).flatten(1).sum(1), diff, rtol=1e-6, atol=1e-8)


def test_diffusion_classifier_config_instantiates_with_the_model(tiny_unet_path):
    """conf/classifier/fmnist_diffusion.yaml: model: ${model} is the generator's own network."""
    from omegaconf import OmegaConf

    from diffguide.command.config import CONF_DIR
    from diffguide.errors import instantiate as _instantiate

    node = OmegaConf.load(CONF_DIR / "classifier" / "fmnist_diffusion.yaml")
    cfg = OmegaConf.create({"model": {"_target_": "diffguide.models.unet.load", "weights": str(tiny_unet_path)},
                            "classifier": node})
    classifier = _instantiate(cfg.classifier)
    assert isinstance(classifier, diffusion.DiffusionClassifier) and classifier.num_classes == 10
    assert isinstance(classifier.model, unet_lib.UNetDenoiser) and len(classifier.timesteps) == node.n_pairs
    with torch.no_grad():
        logits = classifier.logits(torch.zeros(2, 1, 28, 28))
    assert logits.shape == (2, 10) and bool(np.isfinite(logits.numpy()).all())


def test_guidance_samples_with_the_generator_as_its_own_classifier(tmp_path, run_diffguide):
    """classifier=fmnist_diffusion under guidance=offshelf: the gradient of the paper's log-posterior flows through
    the model's own network (2 pairs, 2 steps, the tiny UNet)."""
    result = run_diffguide(tmp_path / "run", "guidance=offshelf", "classifier=fmnist_diffusion",
                           "classifier.n_pairs=2", "num_samples=2", "batch_size=2", "steps=2", "precision=fp32")
    assert result["images_generated"] == 2
