"""Stream a Python continuation from the shipped model and print the Orthrus figures."""

from orthrus_mlx import DecodeStats, load, stream_generate
from orthrus_mlx.loader import DEFAULT_MODEL

model, tokenizer = load(DEFAULT_MODEL)
stats = DecodeStats()
for response in stream_generate(model, tokenizer, "def read_config(path):\n", max_tokens=120, stats=stats):
    print(response.text, end="", flush=True)
print(f"\n\n{stats.steps} steps, {stats.mean_tokens_per_step:.2f} tokens per step, histogram {stats.histogram()}")
