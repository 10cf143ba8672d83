"""APG-mix: classifier-free guidance for the first steps of the trajectory, adaptive projected guidance (Sadat et al.
2024, diffguide/guidance/apg.py) for the rest; diffusers' AdaptiveProjectedMixGuidance (guiders/
adaptive_projected_guidance_mix.py in diffusers 0.42.1), the guider of HunyuanImage-2.1.

Which steps get which. The step index i counts the trajectory's levels (0 = the noisiest). CFG on i < cfg_steps,
APG on i >= cfg_steps: diffusers' rule `self._step > self.adaptive_projected_guidance_start_step` (line 187; strict,
so its default start step 5 gives CFG on steps 0-5, APG from step 6: cfg_steps = start_step + 1 = 6 here). It is a
step count, not a fraction of the trajectory nor a noise level, as in diffusers; the switch is made by noise level,
sigma_t <= sigma of level `cfg_steps`, which is the same rule at the trajectory's own levels and also places the
evaluations some samplers make between two levels (DPM-Solver++(2S)'s midpoint: with the step it belongs to; Heun's
second evaluation, at the next level: with that level).

The two phases, on the denoised predictions D_c, D_u (x0):
    CFG (i < cfg_steps):   D = D_u + w_cfg (D_c - D_u)            (taken on the network's output, as guidance=cfg)
    APG (i >= cfg_steps):  D = D_c + (w - 1) update               (as guidance=apg: update = orthogonal + eta parallel
                                                                   of the momentum-averaged, norm-clipped D_c - D_u)
scale = APG's w (1: the conditional model); cfg_scale = CFG's w on the first steps (null: the same as scale).
The momentum buffer m = (D_c - D_u) + beta m_prev accumulates on EVERY step, the CFG steps included (diffusers
lines 122-125: the CFG branch calls update_momentum_buffer; its docstring, lines 55-57: "before this step,
classifier-free guidance is used, and momentum buffer is updated"), so the first APG step already averages the CFG
steps' differences; it starts from zero with each trajectory (diffusers: a new MomentumBuffer at step 0, lines 92-94).
Both predictions are evaluated on every step (2 NFE).

Mapping to diffusers' AdaptiveProjectedMixGuidance (the cross-check in tests/guidance/test_apg_mix.py):
use_original_formulation=True, adaptive_projected_guidance_scale = scale - 1, guidance_scale = cfg_scale - 1 (its
original formulation is pred_cond + g (pred_cond - pred_uncond) on CFG steps, line 128-129, and pred_cond + g update
on APG steps, line 294-295), adaptive_projected_guidance_rescale = norm_threshold, adaptive_projected_guidance_momentum
= momentum, eta = eta, adaptive_projected_guidance_start_step = cfg_steps - 1, start = 0, stop = 1,
guidance_rescale = 0. Where they differ: diffusers turns APG off whenever its CFG scale means "conditional"
(`_is_apg_enabled` requires `_is_cfg_enabled`, lines 182-183) and runs CFG on the APG steps when its APG scale does
(lines 189-195, 123); here each phase takes its own scale, so cfg_scale = 1 is the conditional model on the first
steps and APG after them, and scale = 1 the conditional model on the APG steps. diffusers' start/stop (the fractions
of the trajectory outside which it takes the conditional model alone) are not exposed: their default, the whole
trajectory, is what this method does. Defaults of eta, norm_threshold and momentum: apg.yaml's, with their sources
(diffusers' own mix defaults are r = 10, beta = -0.5, eta = 0, its APG scale 10 in its non-original form).
"""

from diffguide.errors import UserError
from diffguide.guidance.base import CFGLike, GuidedPrediction
from diffguide.guidance.combine import combine
from diffguide.guidance.projection import momentum_average, projected_update


class APGMix(CFGLike):
    name = "apg_mix"

    def __init__(self, scale: float, cfg_scale: float | None = None, cfg_steps: int = 6, eta: float = 0.0,
                 norm_threshold: float = 1.64, momentum: float = -0.5, schedule=None):
        super().__init__(scale, schedule)
        self.cfg_scale = None if cfg_scale is None else self.check_scale(f"{self.name} cfg_scale", cfg_scale)
        if isinstance(cfg_steps, bool) or not isinstance(cfg_steps, int) or cfg_steps < 0:
            raise UserError(f"guidance=apg_mix: cfg_steps is the number of CFG steps before APG, a whole number "
                            f">= 0 (got {cfg_steps!r})")
        if norm_threshold < 0:
            raise UserError(f"guidance=apg_mix: norm_threshold must be >= 0 (got {norm_threshold}; 0 turns clipping "
                            f"off)")
        self.cfg_steps = cfg_steps
        self.eta, self.norm_threshold, self.momentum = float(eta), float(norm_threshold), float(momentum)
        self._running = None

    def reset(self, denoiser, labels):
        self._running = None

    def is_apg(self, denoiser, t) -> bool:
        """True on the APG steps: at and below the noise level of step `cfg_steps` of the trajectory."""
        if not self.levels:
            raise RuntimeError("guidance=apg_mix needs the trajectory's levels: call begin() first")
        if self.cfg_steps >= len(self.levels):
            return False
        return denoiser.sigma(t) <= self.levels[self.cfg_steps].sigma

    def cfg_weight(self, denoiser, t) -> float:
        """CFG's w at level t: `cfg_scale` (under the schedule, if one is set), or APG's scale where it is null."""
        if self.cfg_scale is None:
            return self.weight(denoiser, t)
        if self.schedule is None:
            return self.cfg_scale
        return self.schedule.weight(self.cfg_scale, denoiser.level(t), self.levels)

    def __call__(self, denoiser, x, t, labels):
        uncond, cond = denoiser.pair(x, t, labels)
        diff = cond.x0 - uncond.x0
        if self.momentum != 0.0:
            self._running = diff = momentum_average(diff, self._running, self.momentum)
        if not self.is_apg(denoiser, t):
            return GuidedPrediction.of(combine(denoiser, x, t, uncond, cond, self.cfg_weight(denoiser, t)), nfe=2)
        update = projected_update(cond.x0, diff, self.eta, self.norm_threshold)
        x0 = cond.x0 + (self.weight(denoiser, t) - 1) * update
        return GuidedPrediction(x0, denoiser.eps_from_x0(x, t, x0), nfe=2)
