"""Flow objectives in the one train loop: pre-train -> SFT (init_from), guidance distillation with a frozen
teacher, and FLUX.1-dev size."""
import jax
import ml_collections
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


@pytest.mark.parametrize("mesh", [dict(data=1, fsdp=8, tensor=1), dict(data=1, fsdp=4, tensor=2)],
                         ids=["fsdp8", "fsdp4_tensor2"])
def test_flux1_dev_train_step_compiles(mesh):
  """The FLUX.1-dev train step (1024 px, batch 1 per device, cached latents/embeddings, scanned blocks) lowers and
  compiles on 8 fake devices; per-device memory is printed (benchmarks/compile_step.py gives the same figures,
  docs/results.md: temp 11.1 GiB for fsdp=8, 14.7 GiB for fsdp=4 x tensor=2 at -O0)."""
  from t2i.train import aot
  cfg = flux1_dev.get_config()
  cfg.mesh = mesh
  cfg.batch_size = 8
  cfg.cache.enabled = True
  report = aot.compile_report(cfg)
  print({k: v for k, v in report.items() if k not in ("compiled", "batch")})
  assert report["params_transformer"] == 11_901_408_320
  # f32 params + Adam moments + EMA of the transformer, unsharded: 16 B per param; the mesh holds 1/8 of it.
  assert report["per_device_argument_GiB"] < 16 * report["params_transformer"] / 2**30 / 8 + 1.0
  assert report["per_device_temp_GiB"] > 0


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


def test_init_from_refuses_other_layer_layout(pretrained, tmp_path):
  """A scan_layers run cannot silently start from a per-layer run's blocks (they would all stay random)."""
  from t2i import parallel
  from t2i.train import init_from, models as models_lib, optimizer as opt_lib, step as step_lib
  cfg = flux_shapes_sft.get_config("smoke")
  cfg.init_from.workdir = str(pretrained)
  cfg.transformer.scan_layers = True
  models = models_lib.build_models(cfg, models_lib.setup_tokenizer(cfg, str(tmp_path)))
  tx, _ = opt_lib.make_optimizer(cfg.optimizer, 10)
  structs, _, f_structs, _ = step_lib.abstract_state(models, tx, parallel.make_mesh(cfg.mesh), cfg.axis_rules, True)
  with pytest.raises(ValueError, match="scan_layers"):
    init_from.pretrained_from_runs(cfg, models, {**structs.params, **f_structs})


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


def test_two_tokenizers_match_flux_pipeline(tmp_path, make_t5_tokenizer):
  """config.tokenizer (CLIP BPE, 77 ids) + config.tokenizer_2 (T5 unigram): our conditioning equals diffusers'
  FluxPipeline.encode_prompt on the same tiny CLIP / T5 checkpoints; a run trains and samples from such a workdir."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  from experiments import common
  from t2i.text.tokenizer import build_clip_tokenizer, default_shapes_corpus
  from t2i.train import models as models_lib

  clip_tok = build_clip_tokenizer(default_shapes_corpus(), tmp_path / "tokenizer")
  t5_tok = transformers.AutoTokenizer.from_pretrained(make_t5_tokenizer(tmp_path / "tokenizer_2", vocab_size=60))
  torch.manual_seed(0)
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
      max_position_embeddings=77, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
      pad_token_id=clip_tok.pad_token_id)).eval()
  t5 = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=60, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, feed_forward_proj="gated-gelu",
      dropout_rate=0.0)).eval()
  clip.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
  t5.save_pretrained(tmp_path / "text_encoder_2", safe_serialization=True)

  cfg = flux_shapes_pretrain.get_config("smoke")
  cfg.tokenizer = ml_collections.ConfigDict(dict(kind="pretrained", path=str(tmp_path / "tokenizer"),
                                                        max_length=77, vocab_size=0))
  cfg.tokenizer_2 = ml_collections.ConfigDict(dict(kind="pretrained", path=str(tmp_path / "tokenizer_2"),
                                                          max_length=24, vocab_size=0))
  cfg.text_encoder = common.module_config("t2i.models.text.CLIPTextModel", checkpoint=str(tmp_path / "text_encoder"),
                                          trainable=False)
  cfg.text_encoder_2 = common.module_config("t2i.models.t5.T5Encoder", checkpoint=str(tmp_path / "text_encoder_2"),
                                            trainable=False)
  cfg.transformer.config.update(joint_attention_dim=32, pooled_projection_dim=16)
  workdir = str(tmp_path / "work")
  tokenize = models_lib.setup_tokenizer(cfg, workdir)
  models = models_lib.build_models(cfg, tokenize)
  prompts = ["a large red circle to the left of a blue square", "two green triangles"]
  ids = tokenize(prompts)
  assert ids.shape == (2, 77 + 24) and tokenize.block_lengths() == (77, 24)
  params = models_lib.pretrained_params(cfg)
  with jax.default_matmul_precision("highest"):
    cond = jax.jit(models.cond)(params, ids)

  pipe = diffusers.FluxPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                                tokenizer_2=t5_tok, transformer=None)
  with torch.no_grad():
    ref_ctx, ref_pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=24)
  for ours, ref in ((cond["encoder_hidden_states"], ref_ctx), (cond["pooled_projections"], ref_pooled)):
    ref = ref.numpy()
    assert ours.shape == ref.shape
    err = np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref))
    print(f"two-tokenizer conditioning {ref.shape}: rel err {err:.2e}")
    assert err < 1e-5, err

  # The same two-tokenizer config trains (data, loop) and samples from its workdir alone (tokenizer_2/ saved).
  rec = loop.train(cfg, workdir)
  assert np.isfinite(rec["loss"])
  from t2i.sample import Sampler
  s = Sampler(workdir)
  np.testing.assert_array_equal(s.tokenize(prompts), ids)
  images = s(prompts[:1], [0], negative_prompt="blurry", num_steps=2, guidance_scale=2.0, sampler="euler")
  assert np.isfinite(np.asarray(images, np.float32)).all()
