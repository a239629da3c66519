"""Dense, Conv and norm layers whose parameters carry logical axis names.

Logical axis names used across t2i (mapped to mesh axes by the rules table in the experiment config):
  activations: "batch", "length" (token sequence), "height", "width", "embed" (channels / hidden)
  parameters:  "embed" (input/hidden features), "mlp" (expanded features), "heads" (heads*head_dim
               projections), "vocab", "conv_in", "conv_out", "norm", and None for small dims (kernel h/w);
               "layers" is the leading axis of blocks stacked for `jax.lax.scan` (`t2i.nn.scan`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.lecun_normal()


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Annotates an activation with logical axes (no-op outside a mesh / rules context)."""
  return nn.with_logical_constraint(x, axes)


class Dense(nn.Module):
  """nn.Dense with logical axis names on kernel (in_axis, out_axis) and bias (out_axis)."""
  features: int
  axes: tuple[str | None, str | None] = ("embed", "mlp")
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # Leading dims are flattened into one: the weight gradient is then a plain 2-D matmul. With [B, L, d] inputs
    # XLA:CPU inserted transposing copies into the backward pass (benchmarks/flux_step.py: step -25 %).
    lead = x.shape[:-1]
    if len(lead) > 1:
      x = x.reshape(-1, x.shape[-1])
    y = nn.Dense(
        self.features,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        precision=self.precision,
        kernel_init=nn.with_logical_partitioning(self.kernel_init, self.axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
        name="dense",
    )(x)
    return y.reshape(lead + (self.features,)) if len(lead) > 1 else y


class Conv(nn.Module):
  """NHWC nn.Conv with logical axis names (None, None, "conv_in", "conv_out")."""
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if tuple(self.kernel_size) == (1, 1) and tuple(self.strides) == (1, 1) and self.padding in ("SAME", "VALID", 0):
      return _Pointwise(self.features, self.use_bias, self.dtype, self.param_dtype, self.kernel_init,
                        self.precision, name="conv")(x)
    return nn.Conv(
        self.features,
        kernel_size=tuple(self.kernel_size),
        strides=tuple(self.strides),
        padding=self.padding,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        precision=self.precision,
        kernel_init=nn.with_logical_partitioning(self.kernel_init, (None, None, "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name="conv",
    )(x)


class _Pointwise(nn.Module):
  """A 1x1 convolution as a matmul over channels, with nn.Conv's parameters ("kernel" [1, 1, in, out], "bias").

  XLA:CPU computed a 1x1 convolution's weight gradient as a generic convolution on transposed copies (U-Net
  gradient profile: 4-8 ms each for [4, 32, 32, 64..192] inputs, 12-25 GFLOP/s); as a 2-D matmul it is a plain
  product."""
  features: int
  use_bias: bool
  dtype: Dtype
  param_dtype: Dtype
  kernel_init: Callable
  precision: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, (None, None, "conv_in", "conv_out")),
                        (1, 1, x.shape[-1], self.features), self.param_dtype)
    bias = (self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                       (self.features,), self.param_dtype) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[2:]), precision=self.precision)
    y = y.reshape(x.shape[:-1] + (self.features,))
    return y if bias is None else y + bias


# Logical axes of the large activations: NHWC feature maps and token sequences.
IMAGE_AXES = ("batch", "height", "width", "embed")
TOKEN_AXES = ("batch", "length", "embed")
_NORM_INPUT_AXES = {4: IMAGE_AXES, 3: TOKEN_AXES}  # what GroupNorm pins on its input, by rank


class GroupNorm(nn.Module):
  """GroupNorm over the channel (last) axis, statistics in float32.

  The input is pinned to its logical layout first: without that, on a data x fsdp x tensor mesh XLA's SPMD
  partitioner gave wrong gradients for the scale / bias of a GroupNorm fed straight from a convolution (up to 100 %
  off, forward exact; `tests/test_parallel.py` on the real U-Net caught it).
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  use_affine: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim in _NORM_INPUT_AXES:
      x = constrain(x, _NORM_INPUT_AXES[x.ndim])
    c = x.shape[-1]
    g = self.num_groups
    orig = x.dtype
    xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (g, c // g))
    red = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
    mean = xf.mean(axis=red, keepdims=True)
    var = jnp.square(xf - mean).mean(axis=red, keepdims=True)
    xf = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    if self.use_affine:
      scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (c,),
                         self.param_dtype)
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,),
                        self.param_dtype)
      xf = xf * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return xf.astype(self.dtype if self.dtype is not None else orig)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, statistics in float32; optional affine parameters."""
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    xf = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      xf = xf * self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (c,),
                           self.param_dtype).astype(jnp.float32)
    if self.use_bias:
      xf = xf + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,),
                           self.param_dtype).astype(jnp.float32)
    return xf.astype(self.dtype)


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale over the last axis (no mean, no bias; T5LayerNorm, FLUX QK-norm)."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                       self.param_dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.epsilon)
    return (xf * scale.astype(jnp.float32)).astype(self.dtype)
