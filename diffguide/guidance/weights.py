"""CFG weight schedules: the scale of a CFG-like method as a function of where the step sits on the trajectory.

Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight Schedulers" (arXiv 2404.13040), write CFG in Ho &
Salimans' form, eps = eps_c + w (eps_c - eps_u) (their Fig. 1 code: `eps = (w+1)*eps_c - w*eps_u`), where w = 0 is the
conditional model, and vary w over the denoising trajectory. Their heuristic schedulers are normalised to the same
area as the static w (integral over 0..T of w(t) dt = w T: the same mean guidance; the Fig. 1 one-liner is
`w = max(1, w0*2*t/T)`, t counting the denoising progress), and the ones that rise with the progress worked best.
(The paper's full text could not be read here. Sources: the Fig. 1 code as quoted in this project's brief; the
formulas 2 w0 (1 - t/T) and w0 (1 + cos(pi t/T)) and the clamp max(c, .) as the unofficial port
v0xie/sd-webui-incantations writes them, read in diffusion time t (t = T pure noise), which makes them rise with the
progress as the paper's Fig. 1 line does (the port feeds them the sampler's step index, i.e. runs them reversed);
the clamp values c second-hand.)
    linear:  w(t) = 2 w0 p                        p = the denoising progress in [0, 1] (1 - t/T in diffusion time)
    cosine:  w(t) = w0 (1 - cos(pi p))            (the paper's w0 (cos(pi t/T) + 1) with t/T = 1 - p)
    clamp_linear, clamp_cosine: w(t) = max(c, the above)   a floor c (the paper's clamp, e.g. c = 1 in Fig. 1;
                                                           SDXL c = 4, SD1.5 c = 2 as it reports them)
Our scale is not Ho & Salimans' w: every method here has a `scale` and a `neutral_scale` (Guidance.neutral_scale),
the scale at which it does not guide (CFG, CFG-rescale, CFG-Zero*, APG, ICG, TSG: w = 1, the conditional model,
i.e. Ho & Salimans' w + 1; CFG++'s lambda and the perturbation scales of PAG/SEG/SLG: 0). A schedule multiplies the
guidance STRENGTH scale - neutral, which is the paper's w for CFG (w_ours - 1 = w_paper):
    w_t = neutral + (scale - neutral) f(p),    f = 2p (linear) or 1 - cos(pi p) (cosine),
and the clamp floors the weight itself, in the units of `scale`:
    w_t = max(floor, neutral + (scale - neutral) f(p))      (the paper's c = floor - neutral; default c = 1, Fig. 1)
For CFG++ (neutral 0) this is the paper's rule on lambda: lambda_t = lambda f(p), lambda = 0 (the unconditional
model) where f = 0; its mean lambda over the trajectory is lambda.

Progress p is a STEP fraction, not a function of sigma: the trajectory given to `Guidance.begin` has N levels
(`Guidance.levels`, descending noise, set by the sampler's grid and `steps`), level i (0 = the noisiest) sits at
p_i = i / (N - 1) (p = 1/2 when N = 1). The paper's t/T is the timestep fraction; on its uniformly spaced DDPM
timesteps the two are the same thing, while on our other grids (Karras' sigmas, a shifted flow grid, DPM-Solver's
spacing) sigma or the model's time is far from uniform in the step index, so a sigma-based p would not keep the
mean. With p_i = i / (N - 1) the mean over the N evaluations is exact: (1/N) sum 2 p_i = 1 and
(1/N) sum (1 - cos(pi p_i)) = 1 (the cosines cancel in pairs), so the mean of w_t over the trajectory is `scale`
for linear and cosine (the clamps only raise it). The first step (p = 0) is unguided (w_t = neutral; CFG spends 1
evaluation there), the last one guides at 2 scale - neutral. An evaluation between two levels (DPM-Solver++(2S)'s
midpoint) gets the fractional index interpolated linearly in the VP noise std noise / sqrt(alpha^2 + noise^2) of
the two levels around it; one at the next level (Heun's second evaluation) is that level's.

interval is the guidance interval of Kynkaenniemi et al. 2024 as a schedule (guidance=cfg_interval's rule and
presets, PRESETS below): w_t = scale where sigma_lo < sigma_t <= sigma_hi, neutral
elsewhere (for CFG: the conditional model, one evaluation), by noise level, not step.

Config (a method's `schedule` key): null or `constant` (the constant scale), a kind (`linear`, `cosine`,
`clamp_linear`, `clamp_cosine`, `interval`), or a dict {kind: KIND, ...}: clamp_* take `floor` (in the scale's
units; default neutral + 1), interval takes `interval` (a preset, default edm2_xxl) and `sigma_lo` / `sigma_hi`
(override the preset's bounds).
"""

import math
from collections.abc import Mapping
from typing import Callable

from diffguide.errors import UserError

#: the guidance interval's (sigma_lo, sigma_hi] of Kynkaenniemi et al. 2024, Table 1, by model (guidance=cfg_interval's
#: presets too)
PRESETS = {"edm2_xxl": (0.19, 1.61), "edm2_s": (0.28, 2.90)}

KINDS = ("constant", "linear", "cosine", "clamp_linear", "clamp_cosine", "interval")

#: the shapes f(p) of the progress-based kinds, each of mean 1 over p_i = i / (N - 1)
SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda p: 2.0 * p,
    "cosine": lambda p: 1.0 - math.cos(math.pi * p),
}

#: the keys each kind takes besides `kind`
KEYS = {"constant": (), "linear": (), "cosine": (), "clamp_linear": ("floor",), "clamp_cosine": ("floor",),
        "interval": ("interval", "sigma_lo", "sigma_hi")}


def progress(level, levels) -> float:
    """p in [0, 1]: the index of `level` on the trajectory `levels` (descending noise) over N - 1; an in-between
    level's index interpolated in noise / norm (the VP noise std) between its neighbours; 1/2 for a one-step
    trajectory."""
    n = len(levels)
    if n == 1:
        return 0.5
    for i, other in enumerate(levels):
        if other == level or other.sigma == level.sigma:
            return i / (n - 1)
    u = level.noise / level.norm
    us = [other.noise / other.norm for other in levels]
    if u >= us[0]:
        return 0.0
    if u <= us[-1]:
        return 1.0
    for i in range(n - 1):
        hi, lo = us[i], us[i + 1]
        if hi >= u >= lo and hi > lo:
            return (i + (hi - u) / (hi - lo)) / (n - 1)
    return 1.0  # unreachable for a descending trajectory


class WeightSchedule:
    """A schedule of the scale: `weight(scale, level, levels)` is the scale at `level` of the trajectory `levels`."""

    kind = ""

    def __init__(self, neutral: float):
        self.neutral = float(neutral)

    def weight(self, scale: float, level, levels) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind})"


class ProgressSchedule(WeightSchedule):
    """linear / cosine, with an optional floor (the clamp_* kinds): w_t = max(floor, neutral + (scale - neutral)
    f(p)) with p the step fraction (see the module docstring)."""

    def __init__(self, kind: str, neutral: float, floor: float | None = None):
        super().__init__(neutral)
        self.kind, self.shape, self.floor = kind, SHAPES[kind.removeprefix("clamp_")], floor

    def weight(self, scale, level, levels):
        if not levels:
            raise RuntimeError(f"the {self.kind} weight schedule needs the trajectory: call Guidance.begin() first")
        w = self.neutral + (scale - self.neutral) * self.shape(progress(level, levels))
        return w if self.floor is None else max(self.floor, w)


class IntervalSchedule(WeightSchedule):
    """The guidance interval: scale where sigma_lo < sigma <= sigma_hi, neutral elsewhere."""

    kind = "interval"

    def __init__(self, neutral: float, sigma_lo: float, sigma_hi: float):
        super().__init__(neutral)
        self.sigma_lo, self.sigma_hi = float(sigma_lo), float(sigma_hi)

    def inside(self, level) -> bool:
        return self.sigma_lo < level.sigma <= self.sigma_hi

    def weight(self, scale, level, levels):
        return scale if self.inside(level) else self.neutral


def _number(name: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"guidance={name}: schedule {key} must be a finite number (got {value!r})")
    return float(value)


def make(name: str, schedule, neutral: float = 1.0) -> WeightSchedule | None:
    """The schedule a `schedule` config describes for method `name` whose scale does not guide at `neutral`
    (None: the constant scale). A bad kind or key is a one-line UserError naming the valid ones."""
    if schedule is None:
        return None
    if isinstance(schedule, str):
        options = {"kind": schedule}
    elif isinstance(schedule, Mapping):
        options = dict(schedule.items())
        if "kind" not in options:
            raise UserError(f"guidance={name}: a schedule dict needs a kind, one of {', '.join(KINDS)} "
                            f"(got {dict(options)!r})")
    else:
        raise UserError(f"guidance={name}: schedule must be null, a kind ({', '.join(KINDS)}) or a dict "
                        f"{{kind: KIND, ...}} (got {schedule!r})")
    kind = options.pop("kind")
    if kind not in KINDS:
        raise UserError(f"guidance={name}: schedule kind {kind!r} is not one of {', '.join(KINDS)}")
    unknown = [key for key in options if key not in KEYS[kind]]
    if unknown:
        takes = f"takes {', '.join(KEYS[kind])}" if KEYS[kind] else "takes no other key"
        raise UserError(f"guidance={name}: schedule {kind} has no key {unknown[0]!r} ({kind} {takes})")
    if kind == "constant":
        return None
    if kind in SHAPES:
        return ProgressSchedule(kind, neutral)
    if kind.startswith("clamp_"):
        floor = options.get("floor")
        floor = neutral + 1.0 if floor is None else _number(name, "floor", floor)
        if floor < neutral:
            raise UserError(f"guidance={name}: schedule {kind} floor must be >= {neutral:g}, the scale that does not "
                            f"guide (got {floor:g})")
        return ProgressSchedule(kind, neutral, floor)
    # interval: the presets and the check of guidance=cfg_interval
    preset = options.get("interval") or "edm2_xxl"
    if preset not in PRESETS:
        raise UserError(f"guidance={name}: schedule interval {preset!r} is not one of {', '.join(PRESETS)}")
    sigma_lo, sigma_hi = PRESETS[preset]
    if options.get("sigma_lo") is not None:
        sigma_lo = _number(name, "sigma_lo", options["sigma_lo"])
    if options.get("sigma_hi") is not None:
        sigma_hi = _number(name, "sigma_hi", options["sigma_hi"])
    if not 0.0 <= sigma_lo < sigma_hi:
        raise UserError(f"guidance={name}: schedule interval needs 0 <= sigma_lo < sigma_hi (got {sigma_lo}, "
                        f"{sigma_hi})")
    return IntervalSchedule(neutral, sigma_lo, sigma_hi)
