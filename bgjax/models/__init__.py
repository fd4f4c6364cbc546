"""Flax linen models whose param trees mirror diffusers / transformers module names."""
