"""shapes-bench: synthetic compositional text-to-image data and its automatic scorer (docs: shapes-bench.md)."""
from data_pipelines.shapes.captions import PromptParseError, TEMPLATES, parse_prompt, text_for
from data_pipelines.shapes.derived import (canonical_caption, caption_targets, edit_triplets, preference_pairs,
                                          vqa_pairs)
from data_pipelines.shapes.evalset import eval_prompts
from data_pipelines.shapes.humans import human_figures
from data_pipelines.shapes.palette import (BACKGROUNDS, COLORS, CURATED_FRACTION, FAMILIES, FLAWS, HELD_OUT,
                                          RELATIONS, SHAPES, SIZES, SPLITS, TRAIN_PAIRS, object_side)
from data_pipelines.shapes.records import generate_records
from data_pipelines.shapes.rendering import decode_image, render, render_clean
from data_pipelines.shapes.scenes import break_scene, scene_for
from data_pipelines.shapes.scoring import detect, score, sharpness, summarize
