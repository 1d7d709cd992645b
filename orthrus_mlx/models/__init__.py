"""One file per architecture, as in mlx-lm's `models/`: each is mlx-lm's model plus the
diffusion attention view (`__call__` is the AR view, `draft` the diffusion view)."""
