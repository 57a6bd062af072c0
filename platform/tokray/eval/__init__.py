"""Evaluation: top-1 on tokens and on raw images through the tokenizer, token agreement of augmented
tokens (``agreement``), common corruptions (``corrupt``) and image metrics (``metrics``: PSNR, entropy)."""
