"""DDIM, CFG++ and null-text inversion (diffguide/editing/inversion.py) on the exact mixture and on a tiny random UNet."""

import math

import pytest
import torch
from diffusers import DDIMInverseScheduler

from diffguide.models import hooks
from diffguide.editing import inversion as inv
from diffguide.errors import UserError
from diffguide.models import gmm
from diffguide.models import unet as unet_lib
from diffguide.models.schedules import CLEAN
from diffguide.samplers.ddim import DDIM


def _data(model, n=6, seed=1):
    x0, y = model.sample_data(n, torch.Generator().manual_seed(seed))
    return x0.double(), y


def _roundtrip_error(model, x0, y, steps, w=1.0, rule="cfg"):
    levels = DDIM(steps).levels(model)
    invert = inv.cfgpp_invert if rule == "cfgpp" else inv.ddim_invert
    xT = invert(model, x0, y, levels, w).xT
    rec, _ = inv.regenerate(model, xT, y, levels, w, rule=rule)
    return float((rec - x0).abs().max())


def test_ddim_inversion_reconstructs_the_mixture_and_the_error_shrinks_with_steps():
    """Inversion then sampling at w = 1 is first order in the step: ~0.54, 0.14, 0.037 at 10, 50, 200 steps on the
    ring, ~0.0075 at 1000 (measured; bound 0.02 at 600); both mixtures, every step count, in float64."""
    for model in (gmm.ring(), gmm.image()):
        x0, y = _data(model, n=3)
        errors = [_roundtrip_error(model, x0, y, steps) for steps in (10, 50, 200)]
        assert errors[0] > 2 * errors[1] > 4 * errors[2], errors
        assert errors[2] < 0.06, errors
    ring = gmm.ring()
    x0, y = _data(ring, n=3)
    assert _roundtrip_error(ring, x0, y, 600) < 0.02


def test_one_ddim_inversion_step_by_hand_and_against_diffusers_inverse_scheduler():
    """The DDIM inversion step (Song et al. 2021 eq. (13) read from x_s to x_t; Mokady et al. 2023 Sec. 3):
    x_t = sqrt(a_t) (x_s - sqrt(1 - a_s) eps) / sqrt(a_s) + sqrt(1 - a_t) eps, eps = the mixture's closed-form
    E[eps | x, c] = noise_t (x - alpha_t mu_c) / (alpha_t^2 s^2 + noise_t^2) at x_s with the target level t; and the
    whole inversion equals diffusers' DDIMInverseScheduler (clip_sample=False, set_alpha_to_one=True) stepped with the
    model called at its timesteps, for both spacings it has."""
    model = gmm.ring()
    x0, y = _data(model, n=3)
    a = model.alphas_cumprod
    levels = DDIM(10, spacing="trailing").levels(model)
    trajectory = inv.ddim_invert(model, x0, y, levels, 1.0).xs
    for k, (s_t, t_t) in enumerate([(-1, 99), (99, 199)]):  # clean -> 99, then 99 -> 199
        x_s = trajectory[k]
        a_s = 1.0 if s_t < 0 else float(a[s_t])
        a_t = float(a[t_t])
        v = a_t * model.std ** 2 + (1 - a_t)
        eps = math.sqrt(1 - a_t) * (x_s - math.sqrt(a_t) * model.means[y]) / v
        by_hand = math.sqrt(a_t) * (x_s - math.sqrt(1 - a_s) * eps) / math.sqrt(a_s) + math.sqrt(1 - a_t) * eps
        torch.testing.assert_close(trajectory[k + 1], by_hand, rtol=1e-12, atol=1e-12)
    for spacing in ("trailing", "leading"):
        levels = DDIM(10, spacing=spacing).levels(model)
        ours = inv.ddim_invert(model, x0, y, levels, 1.0).xT
        scheduler = DDIMInverseScheduler.from_config(
            {k: v for k, v in model.scheduler_config.items() if k in ("num_train_timesteps", "beta_start",
                                                                      "beta_end", "beta_schedule")},
            clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing, steps_offset=0)
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
        scheduler.set_timesteps(10)
        assert [int(t) for t in scheduler.timesteps] == [level.t for level in reversed(levels)]
        x = x0.clone()
        for t in scheduler.timesteps:
            eps = model.predict(x, int(t), y).eps
            x = scheduler.step(eps, int(t), x).prev_sample
        torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)


def test_cfgpp_inversion_step_is_the_official_formula_and_reverses_the_cfgpp_step():
    """CFGpp-diffusion/CFGpp latent_diffusion.py (commit 8035352527eb), InversionDDIMCFGpp.inversion, lines 905-908:
        noise_pred = noise_uc + cfg_guidance * (noise_c - noise_uc)
        z0t = (zt - (1-at_prev).sqrt() * noise_uc) / at_prev.sqrt()
        zt = at.sqrt() * z0t + (1-at).sqrt() * noise_pred
    with the model called at (zt, t): the lower point and the target time. For the same eps values the CFG++ sampling
    step (lines 941-944: x0 from noise_pred, re-noised with noise_uc) undoes it exactly."""
    model = gmm.ring()
    x0, y = _data(model, n=4)
    lam = 0.6
    levels = DDIM(10).levels(model)
    xs = inv.cfgpp_invert(model, x0, y, levels, lam).xs
    path = [CLEAN, *reversed(levels)]
    for k in (0, 3):
        s, t = path[k], path[k + 1]
        zt = xs[k]
        uncond, cond = model.pair(zt, t, y)
        noise_uc, noise_c = uncond.eps, cond.eps
        noise_pred = noise_uc + lam * (noise_c - noise_uc)
        at_prev, at = torch.tensor(s.alpha ** 2, dtype=torch.float64), torch.tensor(t.alpha ** 2, dtype=torch.float64)
        z0t = (zt - (1 - at_prev).sqrt() * noise_uc) / at_prev.sqrt()
        official = at.sqrt() * z0t + (1 - at).sqrt() * noise_pred
        torch.testing.assert_close(xs[k + 1], official, rtol=1e-12, atol=1e-12)
        # the algebraic inverse: CFG++'s sampling step from x_t with these eps returns x_s
        back = inv.sample_step(xs[k + 1], t, s, noise_pred, noise_uc)
        torch.testing.assert_close(back, zt, rtol=1e-10, atol=1e-10)
        # CFG's inversion step is reversed by CFG's step in the same way
        eps = noise_pred
        torch.testing.assert_close(inv.sample_step(inv.invert_step(zt, s, t, eps, eps), t, s, eps, eps), zt,
                                   rtol=1e-10, atol=1e-10)


def test_cfgpp_roundtrip_error_does_not_vanish_with_steps_where_cfgs_does():
    """What the algebraic inverse does not give: the eps of the inversion are evaluated at x_s, not at x_t. For CFG
    that error is O(step) and vanishes; a CFG++ step is a CFG step of weight lam sigma_t / (sigma_t - sigma_next)
    (diffguide/guidance/cfgpp.py), which grows like 1 / step, so on the ring its round trip stays wrong at many steps
    (measured: lam 1.0: 0.67, 0.58 at 10, 200 steps; CFG at w = 3: 0.77, 0.072)."""
    ring = gmm.ring()
    x0, y = _data(ring, n=6)
    cfg = [_roundtrip_error(ring, x0, y, steps, 3.0) for steps in (10, 200)]
    cfgpp = [_roundtrip_error(ring, x0, y, steps, 1.0, "cfgpp") for steps in (10, 200)]
    assert cfg[1] < 0.2 * cfg[0]
    assert cfgpp[1] > 0.5 * cfgpp[0] and cfgpp[1] > 3 * cfg[1], (cfg, cfgpp)


@pytest.fixture
def tiny(tiny_unet_path):
    return unet_lib.load(str(tiny_unet_path))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_null_embedding_override_replaces_null_rows_and_leaves_the_network_bit_identical(tiny):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    y = torch.tensor([3, 6])
    level = tiny.level(500)
    state = _state(tiny)
    uncond_before, cond_before = tiny.pair(x, level, y)
    (embedding,) = tiny.parts().label_embeddings
    assert embedding is tiny.unet.class_embedding
    phi = inv.initial_null_embeddings(tiny, 2)
    torch.testing.assert_close(phi[0][0], tiny.unet.class_embedding.weight[tiny.null_class])
    with hooks.null_embeddings_replaced(tiny, phi):  # the network's own null row: the same predictions
        same_u, same_c = tiny.pair(x, level, y)
    assert torch.equal(same_u.eps, uncond_before.eps) and torch.equal(same_c.eps, cond_before.eps)
    other = [phi[0] + torch.randn_like(phi[0])]
    with hooks.null_embeddings_replaced(tiny, other):
        moved_u, moved_c = tiny.pair(x, level, y)
    assert not torch.allclose(moved_u.eps, uncond_before.eps)
    assert torch.equal(moved_c.eps, cond_before.eps)  # the conditional rows are untouched
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.null_embeddings_replaced(tiny, other):
            tiny.pair(x, level, y)
            raise RuntimeError("boom")
    after_u, after_c = tiny.pair(x, level, y)
    assert torch.equal(after_u.eps, uncond_before.eps) and torch.equal(after_c.eps, cond_before.eps)
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())
    assert "forward" not in embedding.__dict__ and "_diffusers_hook" not in embedding.__dict__


def test_null_text_lowers_its_loss_and_beats_plain_regeneration_at_w_above_one(tiny):
    torch.manual_seed(0)
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    y = torch.tensor([3, 6])
    levels = DDIM(6).levels(tiny)
    w = 2.0
    found = inv.null_text_invert(tiny, x0, y, levels, w, inner_steps=8, lr=0.05)
    assert found.loss_before.shape == found.loss_after.shape == (6, 2)
    assert len(found.embeddings) == 6 and found.embeddings[0][0].shape == (2, tiny.unet.class_embedding.weight.shape[1])
    assert float(found.loss_after[0].sum()) < 0.9 * float(found.loss_before[0].sum())
    assert float(found.loss_after.sum()) < float(found.loss_before.sum())
    with_phi, _ = inv.regenerate(tiny, found.xT, y, levels, w, null_embeddings=found.embeddings)
    plain, _ = inv.regenerate(tiny, found.xT, y, levels, w)
    err = lambda z: float((z - x0).pow(2).mean())  # noqa: E731
    assert err(with_phi) < err(plain)
    # the optimised embeddings reproduce the trajectory the optimisation ended on: its last step's loss
    torch.testing.assert_close(float((with_phi - found.pivot.xs[0]).pow(2).flatten(1).mean(1)[0]),
                               float(found.loss_after[-1, 0]), rtol=1e-4, atol=1e-6)


def test_null_text_refuses_the_mixture_in_one_line():
    model = gmm.ring()
    x0, y = _data(model, n=2)
    with pytest.raises(UserError, match="null_text") as info:
        inv.null_text_invert(model, x0, y, DDIM(3).levels(model), 2.0)
    assert "\n" not in str(info.value)
