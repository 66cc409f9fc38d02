"""Sparse KD losses against posterior targets (docs/MATH.md is the contract), over the Triton kernels of
`bayeskd.kernels`.

divergences.py (the divergences over categories, their closed-form gradients, the reference `sparse_kd_loss`),
fused.py (`fused_posterior_kd` from student logits: the PyTorch path and the ONE backend dispatch, `pick_backend`),
linear.py (the lm_head ops: the loss from hidden states and lm_head without [N, V] logits, chunked or cut).
"""
from bayeskd.losses.divergences import TARGET_FLOOR, sparse_kd_loss
from bayeskd.losses.fused import fused_posterior_kd, fused_posterior_kd_torch, pick_backend
from bayeskd.losses.linear import fused_linear_ce, fused_linear_kd_and_ce, fused_linear_posterior_kd

__all__ = ["TARGET_FLOOR", "sparse_kd_loss", "fused_posterior_kd", "fused_posterior_kd_torch", "pick_backend",
           "fused_linear_posterior_kd", "fused_linear_kd_and_ce", "fused_linear_ce"]
