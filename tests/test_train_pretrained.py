"""config.<model>.checkpoint: modules and initial params come from diffusers / transformers folders."""
import numpy as np
import pytest

from experiments import common, sd_shapes
from t2i import parallel
from t2i.train import models as models_lib
from t2i.train import optimizer as opt_lib
from t2i.train import step as step_lib


def _tiny_reference_folders(tmp_path):
  """A tiny diffusers U-Net and transformers CLIP text model saved as a diffusers pipeline folder."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**UNET)
  unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP))
  clip.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
  (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
  return unet, clip


UNET = dict(sample_size=8, in_channels=3, out_channels=3, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
CLIP = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _clip_embedding(clip):
  return next(v for k, v in clip.state_dict().items() if k.endswith("token_embedding.weight")).numpy()


def test_init_from_pretrained_folders(tmp_path):
  unet, clip = _tiny_reference_folders(tmp_path)
  cfg = sd_shapes.get_config("smoke")
  cfg.image_size = 8
  cfg.mesh = common.mesh_config(data=2, fsdp=2, tensor=2)
  cfg.unet = common.module_config("t2i.models.unet.UNet2DConditionModel", checkpoint=str(tmp_path / "unet"))
  cfg.text_encoder = common.module_config("t2i.models.text.CLIPTextModel", checkpoint=str(tmp_path / "text_encoder"),
                                          trainable=True)
  tok = models_lib.setup_tokenizer(cfg, str(tmp_path / "work"))
  models = models_lib.build_models(cfg, tok)
  assert models.denoiser.block_out_channels == (8, 16) and models.text_encoders["text_encoder"].hidden_size == 16
  mesh = parallel.make_mesh(cfg.mesh)
  tx, _ = opt_lib.make_optimizer(cfg.optimizer, 10)
  _, shards, _, f_shards = step_lib.abstract_state(models, tx, mesh, cfg.axis_rules, True)
  loaded = models_lib.pretrained_params(cfg)
  state, _ = step_lib.init_state(models, tx, mesh, cfg.axis_rules, 0, shards, f_shards, loaded)
  np.testing.assert_array_equal(np.asarray(state.params["unet"]["conv_in"]["conv"]["kernel"]),
                                unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(np.asarray(state.ema_params["text_encoder"]["token_embedding"]["embedding"]),
                                _clip_embedding(clip))
  with pytest.raises(ValueError, match="no loader for t2i.train.toy.ToyUNet"):
    bad = sd_shapes.get_config("smoke").unet
    bad.checkpoint = str(tmp_path / "unet")
    models_lib.build_module(bad, "unet")


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scan_layers"])
def test_convert_cli_checkpoint_starts_a_run(tmp_path, scan):
  """`python -m t2i.convert --pipeline=P --out=D [--scan_layers]` writes a checkpoint that config.init_from restores
  exactly (into a run with the same scan_layers)."""
  from t2i.convert import __main__ as cli
  from t2i.train import init_from
  unet, clip = _tiny_reference_folders(tmp_path / "pipe")
  report = cli.convert(str(tmp_path / "ckpt"), cli.folders(str(tmp_path / "pipe"), {}), scan_layers=scan)
  assert sorted(report) == ["text_encoder", "unet"] and report["unet"]["scan_layers"] == scan
  assert report["unet"]["num_params"] == sum(p.numel() for p in unet.parameters())
  with pytest.raises(FileExistsError, match="choose an empty folder"):
    cli.convert(str(tmp_path / "ckpt"), cli.folders(str(tmp_path / "pipe"), {}))
  with pytest.raises(ValueError, match="model_index.json"):
    cli.folders(str(tmp_path), {})

  cfg = sd_shapes.get_config("smoke")
  cfg.image_size = 8
  cfg.mesh = common.mesh_config(data=2, fsdp=2, tensor=2)
  cfg.unet = common.module_config("t2i.models.unet.UNet2DConditionModel", dict(UNET), scan_layers=scan)
  cfg.text_encoder = common.module_config("t2i.models.text.CLIPTextModel", dict(
      vocab_size=-1, eos_token_id=-1, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=8, hidden_act="quick_gelu"), trainable=True)
  cfg.init_from = dict(workdir=str(tmp_path / "ckpt"), ema=True, step=-1)
  tok = models_lib.setup_tokenizer(cfg, str(tmp_path / "work"))
  models = models_lib.build_models(cfg, tok)
  mesh = parallel.make_mesh(cfg.mesh)
  tx, _ = opt_lib.make_optimizer(cfg.optimizer, 10)
  structs, shards, f_structs, f_shards = step_lib.abstract_state(models, tx, mesh, cfg.axis_rules, True)
  pretrained = init_from.pretrained_from_runs(cfg, models, {**structs.params, **f_structs})
  state, _ = step_lib.init_state(models, tx, mesh, cfg.axis_rules, 0, shards, f_shards, pretrained)
  np.testing.assert_array_equal(np.asarray(state.params["unet"]["conv_in"]["conv"]["kernel"]),
                                unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0))
  attn = state.params["unet"]["down_blocks_0_attentions_0"]
  to_q = attn["transformer_blocks_stack"]["attn1"]["to_q"]["dense"]["kernel"][0] if scan else \
      attn["transformer_blocks_0"]["attn1"]["to_q"]["dense"]["kernel"]
  ref_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
  np.testing.assert_array_equal(np.asarray(to_q), ref_q.detach().numpy().T)
  emb = state.params["text_encoder"]["token_embedding"]["embedding"]
  assert len(emb.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(emb)[:64], _clip_embedding(clip))


def test_init_from_refuses_leaves_of_another_shape_unless_told(tmp_path):
  """A source leaf of another shape (here the text encoder's position table: 8 positions converted, 12 wanted) is
  an error naming it and the flag; with reinit_mismatched it stays freshly initialised and the rest is restored."""
  from t2i.convert import __main__ as cli
  from t2i.train import init_from
  _, clip = _tiny_reference_folders(tmp_path / "pipe")
  cli.convert(str(tmp_path / "ckpt"), cli.folders(str(tmp_path / "pipe"), {}))
  cfg = sd_shapes.get_config("smoke")
  cfg.image_size = 8
  cfg.unet = common.module_config("t2i.models.unet.UNet2DConditionModel", dict(UNET))
  cfg.text_encoder = common.module_config("t2i.models.text.CLIPTextModel", dict(
      vocab_size=-1, eos_token_id=-1, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=12, hidden_act="quick_gelu"), trainable=True)
  cfg.tokenizer.max_length = 12
  cfg.init_from = dict(workdir=str(tmp_path / "ckpt"), ema=True, step=-1)
  models = models_lib.build_models(cfg, models_lib.setup_tokenizer(cfg, str(tmp_path / "work")))
  mesh = parallel.make_mesh(cfg.mesh)
  tx, _ = opt_lib.make_optimizer(cfg.optimizer, 10)
  structs, _, f_structs, _ = step_lib.abstract_state(models, tx, mesh, cfg.axis_rules, True)
  abstract = {**structs.params, **f_structs}
  with pytest.raises(ValueError, match=r"'position_embedding \(8, 16\) -> \(12, 16\)'.*"
                                       r"--config.init_from.reinit_mismatched=True"):
    init_from.pretrained_from_runs(cfg, models, abstract)
  cfg.init_from["reinit_mismatched"] = True
  got = init_from.pretrained_from_runs(cfg, models, abstract)
  assert ("position_embedding",) not in got["text_encoder"] and len(got["text_encoder"]) > 1
  np.testing.assert_array_equal(np.asarray(got["text_encoder"][("token_embedding", "embedding")])[:64],
                                _clip_embedding(clip))


def test_init_from_refuses_a_run_whose_text_encoder_read_another_length(tmp_path):
  """A text encoder's position table of another length would stay freshly initialised (init_from keeps leaves of
  another shape fresh): starting from such a run is an error that names the flag; a converted folder (no
  config.json) and a source without a text encoder (a VQ run before a token LM) are not compared."""
  import json
  from experiments import sd_shapes
  from t2i.train import init_from
  src = tmp_path / "long"
  src.mkdir()
  (src / "config.json").write_text(sd_shapes.get_config("long").to_json_best_effort())
  config = sd_shapes.get_config()
  with pytest.raises(ValueError, match=r"config.json.*max_length=16 tokens.*has 24; pass --config.tokenizer.max_length=16"):
    init_from.check_text_lengths(config, str(src))
  config.tokenizer.max_length = 16
  init_from.check_text_lengths(config, str(src))
  init_from.check_text_lengths(sd_shapes.get_config(), str(tmp_path))  # no config.json
  (src / "config.json").write_text(json.dumps({"tokenizer": {"max_length": 1}, "vq": {}}))
  init_from.check_text_lengths(sd_shapes.get_config(), str(src))
