"""Text features from captions trimmed to the longest in the batch.

open_clip's ``CLIP.encode_text`` always runs the full context (77 tokens for RN50/ViT-B), while
Flickr-style captions are 15–30 tokens. In CLIP's text tower the attention mask is causal and the
feature is read at the EOT position (``argmax``/``eos`` pooling), so a position never sees the
padding after it: cutting every row of the batch after the batch's last non-padding token gives
the same features (up to float rounding) at a fraction of the cost. Models where that does not
hold (no causal mask, a class token, another pooling, another text tower) keep the full context.
"""

from __future__ import annotations

import open_clip
import torch
from open_clip.transformer import text_global_pool

PAD_ID = 0  # open_clip's tokenizer pads with 0


def can_trim(model: torch.nn.Module) -> bool:
    """True for open_clip's built-in text tower with a causal mask and EOT pooling."""
    return (
        type(model).encode_text is open_clip.CLIP.encode_text
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
    )


def trimmed_length(tokens: torch.Tensor) -> int:
    """1 + the last column holding a non-padding token in any row (at least 1)."""
    used = (tokens != PAD_ID).any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (unnormalised), on the trimmed context when allowed."""
    if not can_trim(model):
        return model.encode_text(tokens)
    n = trimmed_length(tokens)
    text = tokens[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x if model.text_projection is None else x @ model.text_projection
