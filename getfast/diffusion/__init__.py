"""Noise schedules, EDM preconditioning and loss, and samplers."""
from getfast.diffusion.loss import EDMLoss
from getfast.diffusion.precond import EDMPrecond
from getfast.diffusion.samplers import ddim, ddim_step, edm_sigmas, euler, heun, nfe, sample, vp_alpha_sigma, vp_denoise

__all__ = ["EDMLoss", "EDMPrecond", "ddim", "ddim_step", "edm_sigmas", "euler", "heun", "nfe", "sample",
           "vp_alpha_sigma", "vp_denoise"]
