"""Retrieval augmentation for the CM3Leon-style token model: a contrastive dual encoder (our small CLIP stand-in,
also used for re-ranking and scoring), an exact MIPS index with CM3Leon's filters, and retrieved-document
prepending (see each module's docstring)."""
from t2i.retrieval.augment import prepend_retrieved
from t2i.retrieval.dual_encoder import (DualEncoder, contrastive_loss, embed_documents, embed_images, embed_texts,
                                        l2_normalize, token_dropout)
from t2i.retrieval.index import Index, build_index, clip_score, normalize_rows, rerank, search
