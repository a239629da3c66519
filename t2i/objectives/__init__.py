"""Training objectives."""
from t2i.objectives.diffusion import (NoiseSchedule, add_noise, diffusion_loss, loss_weights, make_schedule,
                                      per_example_error, sample_noise_and_t, target, velocity)
