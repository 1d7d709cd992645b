"""Orthrus decoding gives exactly the base model's greedy tokens, in fewer steps."""

from orthrus_mlx import DecodeStats, load, mlx_generate
from orthrus_mlx.loader import DEFAULT_MODEL

model, tokenizer = load(DEFAULT_MODEL)
prompt = tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n")
stats = DecodeStats()
orthrus = list(mlx_generate(model, prompt, tokenizer.eos_token_id, max_tokens=100, stats=stats))
plain = list(mlx_generate(model, prompt, tokenizer.eos_token_id, max_tokens=100, use_diffusion=False))
print("identical:", orthrus == plain)
print(f"{len(orthrus)} tokens: prefill + {stats.steps} draft+verify steps, instead of {len(plain) - 1} AR steps")
print(tokenizer.decode(orthrus))
