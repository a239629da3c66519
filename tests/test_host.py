"""One XLA CPU device per core (t2i/parallel/host.py): the count fits the batch and mesh; XLA_FLAGS wins."""
import ml_collections

from t2i.parallel import host


def test_devices_for_fits_batch_and_fixed_axes():
  assert host.devices_for(8, 32) == 8
  assert host.devices_for(8, 12) == 6          # largest count <= cores that divides the batch
  assert host.devices_for(2, 3) == 1
  assert host.devices_for(6, 32, fixed=4) == 4  # a fixed tensor=4 axis needs a multiple of 4
  assert host.devices_for(3, None, fixed=4) == 1
  assert host.devices_for(0) == 1


def test_set_cpu_devices_keeps_a_count_already_in_xla_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--foo=1 --xla_force_host_platform_device_count=8")
  assert host.set_cpu_devices(2) == 8
  assert host.set_cpu_devices(2) == 8
  monkeypatch.setenv("XLA_FLAGS", "--foo=1")
  assert host.set_cpu_devices(2) == 2
  assert "--foo=1" in host.os.environ["XLA_FLAGS"] and "device_count=2" in host.os.environ["XLA_FLAGS"]
  monkeypatch.setenv("XLA_FLAGS", "")
  assert host.set_cpu_devices(1) == 1 and host.os.environ["XLA_FLAGS"] == ""


def test_config_with_a_fixed_mesh_keeps_xla_default(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  c = ml_collections.ConfigDict(dict(batch_size=32, mesh=dict(data=2, fsdp=2, tensor=2)))
  assert host.cpu_devices_for_config(c, cores=8) == 1 and host.os.environ["XLA_FLAGS"] == ""
  c.mesh.data = -1
  assert host.cpu_devices_for_config(c, cores=8) == 8
  assert host.os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
