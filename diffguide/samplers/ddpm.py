"""DDPM ancestral sampling (Ho et al. 2020), with the posterior variance beta-tilde ("fixed_small") or the model's
learned variance ("learned": improved DDPM's `learned_range`, Nichol & Dhariwal 2021, as DiT samples).

On any subsequence of timesteps the posterior q(x_next | x_t, x0) is DDIM's update at eta = 1, which is how it is
written here; with the full 1000 steps it is the DDPM paper's sampler exactly. A guidance score moves the mean by
(Sigma_t + boost) * score, as guided-diffusion's `p_sample` with `condition_mean` (and EluCD's `p_sample`) do.

variance = learned (guided-diffusion gaussian_diffusion.py, `p_mean_variance`, ModelVarType.LEARNED_RANGE): the
network's variance channels v in [-1, 1] interpolate, in log space, between the step's posterior variance and its
beta: frac = (v + 1) / 2, log Sigma_t = frac log(beta_step) + (1 - frac) log(posterior_variance), with
beta_step = 1 - a_t / a_next of the respaced trajectory; on the last step, whose posterior variance is 0, the log is
clipped to the posterior variance of the step before (guided-diffusion's `posterior_log_variance_clipped`). The mean
stays the posterior mean; x_next = mean + exp(log Sigma_t / 2) z, with no noise on the last step. The variance is that
of the conditional prediction (DiT's `forward_with_cfg` takes it from the conditional half of its batch), or of the
step's only forward (an unconditional model, guidance=none with guidance.conditional=false).
"""

import math

from diffusers import DDPMScheduler

from diffguide.errors import UserError
from diffguide.models.schedules import CLEAN, posterior_variance
from diffguide.samplers.ddim import DDIM

VARIANCES = ("fixed_small", "learned")
#: the guidance methods whose every step has a forward the learned variance can be taken from
LEARNED_VARIANCE_GUIDANCE = ("none, cfg, cfg_rescale, cfgpp, apg, cfg_interval, autoguidance, gfcg, classifier, "
                             "offshelf, universal, cfg_zero_star with guidance.zero_init_steps=0")
#: methods that forward parts of the batch (adaptive: the samples it has switched to the conditional model alone),
#: whose rows the learned variance cannot be matched to: refused at their first step, not at their first switch
PART_BATCH_GUIDANCE = ("adaptive",)


class DDPM(DDIM):
    name = "ddpm"
    scheduler_class = DDPMScheduler
    ancestral = True

    def __init__(self, steps: int, spacing: str = "trailing", clip_x0: bool = True, variance: str = "fixed_small",
                 dynamic_threshold: float | None = None):
        super().__init__(steps, eta=1.0, spacing=spacing, clip_x0=clip_x0, dynamic_threshold=dynamic_threshold)
        if variance not in VARIANCES:
            raise UserError(f"sampler.variance={variance!r} is not one of {', '.join(VARIANCES)}")
        self.variance = variance
        self.uses_model_variance = variance == "learned"

    def check(self, denoiser, guidance=None):
        super().check(denoiser, guidance)
        if self.uses_model_variance and denoiser.num_train_timesteps is None:
            raise UserError("sampler.variance=learned needs a discrete-time model with variance channels")
        if self.uses_model_variance and not denoiser.learned_variance:
            raise UserError(f"sampler.variance=learned needs a model that predicts its variance (model=dit_xl_2_256); "
                            f"this model outputs eps only: use sampler.variance=fixed_small")

    def model_log_variance(self, denoiser, guidance, labels, levels, i):
        t = levels[i]
        t_next = levels[i + 1] if i + 1 < len(levels) else CLEAN
        v = denoiser.captured_variance(denoiser.condition(labels, True), len(labels))
        if v is None or guidance.name in PART_BATCH_GUIDANCE:
            raise UserError(f"sampler.variance=learned: guidance={guidance.name} gives no whole-batch forward at "
                            f"t={t.t} "
                            f"to take the learned variance from (the conditional prediction, or the step's only "
                            f"forward); it works with guidance={LEARNED_VARIANCE_GUIDANCE}; or use "
                            f"sampler.variance=fixed_small")
        a_t, a_next = denoiser.alpha(t), denoiser.alpha(t_next)
        max_log = math.log(1 - a_t / a_next)
        if not t_next.clean:
            min_log = math.log(posterior_variance(t, t_next))
        elif len(levels) > 1:  # the last step: clipped to the previous step's posterior variance
            min_log = math.log(posterior_variance(levels[-2], t))
        else:
            min_log = max_log
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def step(self, denoiser, x, t, t_next, pred, noise, predict=None):
        if pred.log_variance is None:
            x_next = super().step(denoiser, x, t, t_next, pred, noise, predict)
            variance = posterior_variance(t, t_next)
        else:
            x_next = self.mean(t_next, pred, posterior_variance(t, t_next))
            if not t_next.clean:
                x_next = x_next + (0.5 * pred.log_variance).exp() * noise()
            variance = pred.log_variance.exp()
        if pred.score is not None:
            x_next = x_next + (variance + pred.score_boost) * pred.score
        return x_next
