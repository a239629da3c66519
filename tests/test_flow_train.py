"""Flow objectives in the one train loop: pre-train -> SFT (init_from), guidance distillation with a frozen
teacher, and FLUX.1-dev size."""
import jax
import numpy as np
import pytest

from experiments import flux1_dev, flux_shapes_distill, flux_shapes_pretrain, flux_shapes_sft
from t2i.train import loop
from t2i.train.models import build_module
from t2i.train.state import param_count


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  wd = tmp_path_factory.mktemp("flux_pretrain")
  rec = loop.train(flux_shapes_pretrain.get_config("smoke"), str(wd))
  assert np.isfinite(rec["loss"]) and 0.0 < rec["t_mean"] < 1.0
  return wd


def test_flux1_dev_param_count():
  cfg = flux1_dev.get_config()
  m = build_module(cfg.transformer, "transformer")
  from t2i.models.mmdit import dummy_inputs
  shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), **dummy_inputs(m, h_tokens=2, w_tokens=2)))
  n = param_count(shapes["params"])
  assert abs(n - 11.9e9) / 11.9e9 < 0.01, n
  assert n == 11_901_408_320  # diffusers FluxTransformer2DModel, FLUX.1-dev config


def test_sft_starts_from_pretrain_ema(read_group, pretrained, tmp_path):
  cfg = flux_shapes_sft.get_config("smoke")
  cfg.init_from.workdir = str(pretrained)
  cfg.optimizer.lr = 0.0   # no update: the SFT run's params stay the loaded ones
  cfg.ema.decay = 0.0
  loop.train(cfg, str(tmp_path))
  for group in ("transformer", "text_encoder", "text_encoder_2"):
    src, got = read_group(pretrained, group), read_group(tmp_path, group, key="params")
    assert src.keys() == got.keys()
    for k in src:
      np.testing.assert_array_equal(src[k], got[k], err_msg=f"{group}/{k}")


def test_guidance_distillation_keeps_teacher_frozen(read_group, pretrained, tmp_path):
  cfg = flux_shapes_distill.get_config("smoke")
  cfg.init_from.workdir = str(pretrained)
  rec = loop.train(cfg, str(tmp_path))
  assert np.isfinite(rec["loss"]) and rec["g_mean"] >= 1.0
  teacher, ref = read_group(pretrained, "transformer"), read_group(tmp_path, "reference", kind="frozen")
  assert teacher.keys() == ref.keys()
  for k in teacher:
    np.testing.assert_array_equal(teacher[k], ref[k], err_msg=str(k))
  student = read_group(tmp_path, "transformer", key="params")
  assert any("guidance" in "/".join(k) for k in student)   # the student has a guidance embedder, the teacher not
  assert not any("guidance" in "/".join(k) for k in ref)
  # The student samples with its embedded guidance: one model pass per step (no unconditional batch).
  from t2i.sample import Sampler
  s = Sampler(str(tmp_path))
  calls = []
  orig = s.models.denoiser.apply

  def counting_apply(*a, **kw):
    calls.append(kw["hidden_states"].shape[0])
    return orig(*a, **kw)
  object.__setattr__(s.models.denoiser, "apply", counting_apply)
  imgs = s(["a red circle", "a blue square"], [0, 1], num_steps=3, guidance_scale=4.0, sampler="euler")
  assert imgs.shape == (2, 16, 16, 3) and np.isfinite(imgs).all()
  assert calls == [2]  # traced once inside the compiled loop, on the 2 prompts only (no CFG doubling)
