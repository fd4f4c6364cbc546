"""Data: BG60k and folder readers, record writers, the grain input pipeline, augmentations."""
