"""Token-domain augmentation on the device: Token-EDA, Emb-Noise, ColorAdapt, RRC/flip on embedding
maps with cosine requantization, TokenAdapt (f -> A -> g) and Mixup/CutMix; see ``pipeline``."""

from tokray.augment.geometry import GeometrySpec, center_crop_ids, warp
from tokray.augment.pipeline import TokenAugment, build_token_augment
from tokray.augment.tokenadapt import load_tokenadapt, save_tokenadapt

__all__ = ["GeometrySpec", "TokenAugment", "build_token_augment", "center_crop_ids",
           "load_tokenadapt", "save_tokenadapt", "warp"]
