"""Weight conversion between diffusers / original SD checkpoints and bgjax model directories."""
