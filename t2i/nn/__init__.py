"""Shared layers. Every parameter carries logical axis names (see t2i.parallel.rules)."""
from t2i.nn.layers import Conv, Dense, GroupNorm, LayerNorm, RMSNorm, constrain
from t2i.nn.attention import dot_product_attention
