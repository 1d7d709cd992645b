"""Training tools for the tiny Orthrus checkpoint (PyTorch; not imported by `orthrus_mlx`).

Recreate the shipped checkpoint with `python -m orthrus_mlx.train --out orthrus_mlx/assets/orthrus-tiny`.
"""
