"""Optimiser (schedule, decay mask, clipping, accumulation), EMA and the held-out loss's data config."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import common
from t2i.train import ema
from t2i.train import optimizer as opt_lib


def test_schedule_warmup_then_cosine():
  cfg = common.optimizer_config(lr=1.0, warmup_steps=10, schedule="cosine")
  sched = opt_lib.lr_schedule(cfg, total_steps=110)
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110)], [0, 0.5, 1.0, 0.5, 0.0],
                             atol=1e-6)
  const = opt_lib.lr_schedule(common.optimizer_config(lr=2.0, schedule="constant"), 100)
  assert float(const(0)) == float(const(99)) == 2.0
  with pytest.raises(ValueError, match="optimizer.schedule='linear'"):
    opt_lib.lr_schedule(common.optimizer_config(schedule="linear"), 10)


def test_weight_decay_mask_skips_vectors():
  cfg = common.optimizer_config(lr=1.0, weight_decay=0.5, schedule="constant", grad_clip=0.0)
  tx, _ = opt_lib.make_optimizer(cfg, 10)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.5)   # decay only: -lr * wd * p
  np.testing.assert_allclose(updates["bias"], 0.0)


def test_clipping_and_accumulation():
  cfg = common.optimizer_config(lr=0.1, schedule="constant", weight_decay=0.0, grad_clip=1.0, grad_accum=2)
  cfg.name = "sgd"
  tx, _ = opt_lib.make_optimizer(cfg, 10)
  p = {"w": jnp.zeros((4,))}
  s = tx.init(p)
  u1, s = tx.update({"w": jnp.full((4,), 10.0)}, s, p)
  np.testing.assert_allclose(u1["w"], 0.0)               # first micro-step: no update yet
  u2, s = tx.update({"w": jnp.full((4,), 30.0)}, s, p)
  # mean grad 20 per entry -> norm 40 -> clipped to norm 1 -> each entry 0.5 -> sgd step -0.05.
  np.testing.assert_allclose(u2["w"], -0.05, rtol=1e-6)


def test_lr_scale_per_group():
  """config.optimizer.lr_scale multiplies one group's AdamW step (decay included); unknown groups fail by name."""
  cfg = common.optimizer_config(lr=0.1, schedule="constant", weight_decay=0.5, grad_clip=0.0)
  cfg.lr_scale = {"text_encoder": 3.0}
  tx, _ = opt_lib.make_optimizer(cfg, 10)
  params = {"unet": {"kernel": jnp.ones((2, 2))}, "text_encoder": {"kernel": jnp.ones((2, 2))}}
  grads = jax.tree.map(lambda p: 0.25 * p, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is lr * sign(g) = 0.1, decay lr * wd * p = 0.05: -0.15, and three times that.
  np.testing.assert_allclose(updates["unet"]["kernel"], -0.15, rtol=1e-5)
  np.testing.assert_allclose(updates["text_encoder"]["kernel"], -0.45, rtol=1e-5)
  cfg.lr_scale = {"text_encoderr": 3.0}
  tx, _ = opt_lib.make_optimizer(cfg, 10)
  with pytest.raises(ValueError, match=r"lr_scale: no trainable group \['text_encoderr'\]"):
    tx.init(params)


def test_lr_scale_in_the_train_loop(tmp_path):
  """lr_scale through the one loop (sharded optimiser state): a text encoder scaled by 0 stays put."""
  import orbax.checkpoint as ocp
  from experiments import sd_shapes
  from t2i.train import loop
  cfg = sd_shapes.get_config("smoke")
  cfg.optimizer.lr_scale = {"text_encoder": 0.0}
  cfg.optimizer.weight_decay = 0.0
  assert np.isfinite(loop.train(cfg, str(tmp_path))["loss"])
  first, last = (ocp.PyTreeCheckpointer().restore(f"{tmp_path}/checkpoints/{s}/state")["params"]
                 for s in (2, cfg.total_steps))
  for group, moved in (("text_encoder", False), ("unet", True)):
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p[group])]) for p in (first, last))
    assert np.array_equal(a, b) != moved, group


def _ingest_folders(tmp_path, alpha: int | None = None, size: int = 16) -> None:
  """Folders "subject" and "class" of 4 flat images each (RGBA with alpha `alpha` unless None), ingested."""
  from PIL import Image
  from data_pipelines import ingest
  for name in ("subject", "class"):
    (tmp_path / name).mkdir()
    for i in range(4):
      pixels = np.full((size, size, 3 if alpha is None else 4), 60 * i, np.uint8)
      if alpha is not None:
        pixels[..., 3] = alpha
      Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
      (tmp_path / name / f"{i}.txt").write_text(f"a {name} {i}")
    ingest.ingest_folder(tmp_path / name, tmp_path / f"data_{name}", verbose=False)


def _sources(tmp_path, weights=(1.0, 1.0)) -> tuple:
  return tuple({"dataset": "image_folder", "data_dir": str(tmp_path / f"data_{n}"), "repeats": 2 - i,
                "loss_weight": w} for i, (n, w) in enumerate(zip(("subject", "class"), weights)))


def test_weighted_sources_in_the_train_loop(tmp_path):
  """Per-source loss weights (DreamBooth-style prior preservation) reach the loss through the one loop: two
  ingested folders weighted 0 give loss and gradient exactly 0; weighted 1 and 0.5 the loss is nonzero."""
  from experiments import sd_shapes
  from t2i.train import loop
  _ingest_folders(tmp_path)
  for weights, zero in (((0.0, 0.0), True), ((1.0, 0.5), False)):
    cfg = sd_shapes.get_config("smoke")
    cfg.total_steps, cfg.eval.every = 2, 2 if zero else 0
    cfg.eval.data = ml_collections.ConfigDict(dict(dataset="image_folder", data_dir=str(tmp_path / "data_class")))
    cfg.data = ml_collections.ConfigDict(dict(name="tfds", data_dir=str(tmp_path), caption_dropout=0.0,
                                              sources=_sources(tmp_path, weights)))
    m = loop.train(cfg, str(tmp_path / f"run_{weights}"))
    assert (float(m["loss"]) == 0.0 and float(m["grad_norm"]) == 0.0) == zero, (weights, m)
    if zero:  # the held-out loss reads the named data set alone, unweighted
      assert float(m["eval_loss"]) > 0, m


@pytest.mark.parametrize("experiment,cases", [("sd_shapes", (True, False)), ("flux_shapes_pretrain", (True,))])
def test_alpha_mask_in_the_train_loop(tmp_path, experiment, cases):
  """config.data.alpha_mask: fully transparent images (alpha kept by ingest) give loss and gradient exactly 0 for
  the U-Net and the MMDiT (packed latents); the same images without the option train on every pixel."""
  import importlib
  from t2i.train import loop
  _ingest_folders(tmp_path, alpha=0)
  for masked in cases:
    cfg = importlib.import_module(f"experiments.{experiment}").get_config("smoke")
    cfg.total_steps = 2
    cfg.eval = ml_collections.ConfigDict(dict(every=0))
    cfg.data = ml_collections.ConfigDict(dict(name="tfds", data_dir=str(tmp_path), caption_dropout=0.0,
                                              sources=_sources(tmp_path), alpha_mask=masked))
    m = loop.train(cfg, str(tmp_path / f"run_{masked}"))
    assert (float(m["loss"]) == 0.0 and float(m["grad_norm"]) == 0.0) == masked, (masked, m)


def test_lion_and_adafactor_first_step():
  """Lion's and Adafactor's first update is -lr * (sign(g) + wd * p) (Adafactor: exact for a rank-1 g**2);
  Adafactor keeps a row and a column vector for a factored matrix instead of a full second moment."""
  a, b = np.linspace(-1, 2, 256, dtype=np.float32), np.linspace(0.5, -3, 128, dtype=np.float32)
  params = {"kernel": jnp.full((256, 128), 2.0), "bias": jnp.ones((128,))}
  grads = {"kernel": jnp.asarray(np.outer(a, b)), "bias": jnp.asarray(b)}
  for name in ("lion", "adafactor"):
    cfg = common.optimizer_config(lr=0.1, schedule="constant", weight_decay=0.5, grad_clip=0.0)
    cfg.name = name
    tx, _ = opt_lib.make_optimizer(cfg, 10)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * (np.sign(np.outer(a, b)) + 0.5 * 2.0), rtol=1e-4,
                               atol=1e-6, err_msg=name)
    np.testing.assert_allclose(updates["bias"], -0.1 * np.sign(b), rtol=1e-4, err_msg=name)  # vectors: no decay
    sizes = sorted(x.size for x in jax.tree.leaves(state) if x.ndim)
    if name == "lion":   # one moment per parameter
      assert sizes == [128, 256 * 128]
    else:                # factored kernel: 256 + 128 numbers; the bias keeps a full (128,) second moment
      assert 256 * 128 not in sizes and {256, 128} <= set(sizes), sizes
  cfg.name = "adamm"
  with pytest.raises(ValueError, match="optimizer.name='adamm'"):
    opt_lib.make_optimizer(cfg, 10)


@pytest.mark.parametrize("name", ["lion", "adafactor"])
def test_other_optimizers_in_the_sharded_train_loop(tmp_path, name):
  """Lion and Adafactor train through the one loop on the 8-device mesh; Adafactor's factored statistics (which
  do not have their parameter's shape) are replicated, its full-shape ones sharded like their parameter."""
  from experiments import sd_shapes
  from t2i.train import loop
  cfg = sd_shapes.get_config("smoke")
  cfg.optimizer.name = name
  cfg.optimizer.factored_min_dim = 8   # the toy models' matrices are small: factor them anyway
  assert np.isfinite(loop.train(cfg, str(tmp_path))["loss"])
  p = {"k": jax.ShapeDtypeStruct((16, 32), jnp.float32), "b": jax.ShapeDtypeStruct((40,), jnp.float32)}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
  shard = jax.sharding.NamedSharding
  p_shards = {"k": shard(mesh, jax.sharding.PartitionSpec("fsdp", "tensor")),
              "b": shard(mesh, jax.sharding.PartitionSpec("tensor"))}
  repl = shard(mesh, jax.sharding.PartitionSpec())
  tx, _ = opt_lib.make_optimizer(cfg.optimizer, 10)
  abstract, shardings = opt_lib.opt_state_shardings(tx, p, p_shards, repl)
  shapes = []
  for leaf, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    expect = p_shards["k"] if leaf.shape == (16, 32) else p_shards["b"] if leaf.shape == (40,) else repl
    assert s == expect, (leaf.shape, s)
    shapes.append(leaf.shape)
  assert ((16,) in shapes and (32,) in shapes) == (name == "adafactor"), shapes  # the kernel's row and column
  # What one device holds (benchmarks/compile_step.py --nocompile): Lion an eighth of the kernel's moment and 10
  # of the bias's 40; Adafactor all of the (replicated) row and column, 10 of the bias's second moment and three
  # one-number placeholders (the kernel's unused full moment, the bias's unused row and column).
  from t2i import parallel
  from t2i.train import aot
  moments = [x for x in jax.tree.leaves(parallel.to_struct(abstract, shardings)) if x.ndim]  # not step counts
  floats = {"lion": 16 * 32 // 8 + 40 // 4, "adafactor": 16 + 32 + 40 // 4 + 3}[name]
  assert aot.per_device_bytes(moments) == 4 * floats


def test_ema_updates_every_n():
  cfg = ml_collections.ConfigDict(dict(decay=0.5, every=2, warmup=False))
  e = {"w": jnp.zeros(())}
  p = {"w": jnp.ones(())}
  e1 = ema.update(e, p, jnp.int32(1), cfg)
  assert float(e1["w"]) == 0.0                            # step 1: not an update step
  e2 = ema.update(e1, p, jnp.int32(2), cfg)
  assert float(e2["w"]) == 0.5
  e4 = ema.update(e2, p, jnp.int32(4), cfg)
  assert float(e4["w"]) == 0.75
  assert ema.update(None, p, jnp.int32(2), cfg) is None
  assert not ema.enabled(ml_collections.ConfigDict(dict(decay=0.0)))
  warm = ml_collections.ConfigDict(dict(decay=0.999, every=1, warmup=True))
  assert float(ema.update(e, p, jnp.int32(1), warm)["w"]) == pytest.approx(1 - 2 / 11)


def test_eval_data_lays_only_set_fields_over_the_training_data():
  from experiments import sd_shapes, sd_shapes_dpo
  from t2i.train import loop
  got = loop.eval_data_config(sd_shapes.get_config()).data   # the demo: held-out-combination images
  assert (got.name, got.shapes_split, got.shapes_num) == ("shapes", "heldout", 256)
  dpo = sd_shapes_dpo.get_config()                            # cleared fields leave the pair data as it is
  assert loop.eval_data_config(dpo).data.to_dict() == dpo.data.to_dict() and dpo.eval.every == 0
  c = common.base_config()
  c.data = ml_collections.ConfigDict(dict(name="tfds", dataset="mine/v1", split="train", data_dir="d"))
  c.eval.data.split = "validation"                             # as --config.eval.data.split=validation
  assert loop.eval_data_config(c).data.to_dict() == dict(name="tfds", dataset="mine/v1", split="validation",
                                                         data_dir="d")
  assert loop.eval_data_config(c).data is not c.data and c.data.split == "train"
