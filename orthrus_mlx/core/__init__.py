"""The backend-free core: the decoding step over token ids, block policies, sampling
parameters, step costs and checkpoint checks. Imports neither mlx nor torch."""
