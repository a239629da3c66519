"""Samplers."""
from t2i.sampling.diffusion import sample, sample_jit, timesteps_for
