"""adala: linear-attention ViTs adapted from pretrained vision foundation models (ViT-AdaLA)."""

__version__ = "0.1.0"
