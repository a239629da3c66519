"""Pieces shared by experiment configs: mesh, logical-axis rules, optimiser, checkpointing, logging."""
from __future__ import annotations

import ml_collections

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated). One table for every model.
# A mesh axis that does not divide a dimension is dropped for that array (replicated on that axis instead).
AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("height", None),
    ("width", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("norm", None),
)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """Mesh shape over axes (data, fsdp, tensor); -1 fills the remaining devices."""
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})
