"""Mesh, logical axis rules -> shardings, sharded init, host <-> global arrays."""
from t2i.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from t2i.parallel.sharding import (abstract_init, batch_sharding, flax_rules, global_to_host, host_to_global,
                                   logical_shardings, logical_to_spec, rules_dict, sharded_init, to_struct,
                                   traced_in, tracing_context)
