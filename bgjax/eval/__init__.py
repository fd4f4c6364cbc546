"""Evaluation metrics: CLIP background similarity and FID (InceptionV3 features, Frechet distance)."""
