"""APG's projected update and its momentum buffer (Sadat et al. 2024), shared by apg and apg_mix."""

import torch


def momentum_average(diff: torch.Tensor, running: torch.Tensor | None, momentum: float) -> torch.Tensor:
    """APG's momentum buffer after one more difference: m = diff + momentum m_prev, with m_prev = 0 before the first
    (diffusers' MomentumBuffer.update)."""
    return diff if running is None else diff + momentum * running


def projected_update(x0_cond: torch.Tensor, diff: torch.Tensor, eta: float, norm_threshold: float) -> torch.Tensor:
    """APG's update from a (momentum-averaged) difference D_c - D_u: clipped to L2 norm `norm_threshold` (0: no
    clipping), split into its part parallel to D_c and the orthogonal rest, orthogonal + eta parallel. Norms and
    projections per sample over all non-batch dimensions; the projection in float64 (as diffusers' does)."""
    dims = list(range(1, x0_cond.ndim))
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.clamp(norm_threshold / norm, max=1.0)
    diff64, unit = diff.double(), torch.nn.functional.normalize(x0_cond.double().flatten(1), dim=1)
    unit = unit.view_as(x0_cond)
    parallel = (diff64 * unit).sum(dim=dims, keepdim=True) * unit
    return ((diff64 - parallel) + eta * parallel).to(diff.dtype)
