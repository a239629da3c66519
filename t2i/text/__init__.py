"""Text tokenisation for training (CLIP-format BPE tokenizers built offline)."""
from t2i.text.tokenizer import build_clip_tokenizer, default_shapes_corpus, tokenize
