"""PyTorch reference of the Orthrus model (no mlx imports here)."""
