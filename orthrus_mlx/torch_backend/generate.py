"""Token generation with the PyTorch backend: the same options and output as `mlx_generate`."""

from typing import Iterable, Iterator, List, Optional, Sequence, Union

import torch

from ..core.costs import CONTEXT, CostStore, adaptive_policy, machine_key, source_hash
from ..core.policy import AdaptiveBlock, BlockPolicy
from ..core.sampling import SamplingParams
from ..core.step import DecodeStats, eos_set, generate_steps, token_ids
from . import model as model_module
from .backend import TorchBackend
from .cache import KVCache
from .model import Model

CACHE_ROUNDING = 64  # whole multiples keep the attention shapes aligned on GPUs


def cache_capacity(model: Model, needed: int, compile: bool = False) -> int:
    """Room for `needed` positions; powers of two when compiled, so few shapes ever compile."""
    rounded = -(-max(needed, 1) // CACHE_ROUNDING) * CACHE_ROUNDING
    if compile:
        rounded = 1 << (rounded - 1).bit_length()
    return min(rounded, model.args.max_position_embeddings)


def cost_key(model: Model) -> str:
    """What a step's cost depends on: this machine, torch and the device, the code that runs a
    step (model, backend, cache), the shapes and the dtype."""
    weight = model.model.embed_tokens.weight
    device = torch.cuda.get_device_name(weight.device) if weight.is_cuda else "cpu"
    code = source_hash(model_module, TorchBackend, KVCache)
    return machine_key("torch", torch.__version__, device, code, repr(model.args), str(weight.dtype))


def adaptive_block(model: Model, store: Optional[CostStore] = None) -> AdaptiveBlock:
    """A fresh adaptive block policy for `model` on its device (see `orthrus_mlx.backend.adaptive_block`)."""
    make_backend = lambda: TorchBackend(model, model.make_cache(cache_capacity(model, CONTEXT + model.block_size)))
    return adaptive_policy(cost_key(model), make_backend, model.block_size, store)


def torch_generate(
    model: Model,
    prompt_tokens: Union[Sequence[int], torch.Tensor],
    eos_token_id: Union[int, Iterable[int], None] = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    use_diffusion: bool = True,
    *,
    block_size: Union[int, str, BlockPolicy, None] = None,
    prompt_cache: Optional[KVCache] = None,
    stats: Optional[DecodeStats] = None,
    compile: bool = False,
    **processing,
) -> Iterator[int]:
    """Yield accepted token ids one at a time; output is exactly the base model's.

    `eos_token_id` (an int or a list) is joined with the EOS ids of the model's config.
    `prompt_cache` (from `model.make_cache(capacity)`) may already hold earlier tokens;
    then `prompt_tokens` are only the new ones. `compile` runs the per-step passes through
    torch.compile (CUDA graphs on a GPU); each new cache capacity compiles once, so reuse a
    `prompt_cache` (`cache.reset()`) across generations. `processing` (min_p, the penalties,
    logit_bias) is refused: only the MLX backend runs logits processors.
    """
    if "sampler" in processing or "logits_processors" in processing:
        raise ValueError("The PyTorch backend takes no sampler= or logits_processors=; use the MLX backend.")
    params = SamplingParams(temperature, top_p, top_k, seed, **processing)  # TorchBackend refuses processors

    def make_backend(prompt: List[int], policy: BlockPolicy) -> TorchBackend:
        cache = prompt_cache
        if cache is None:
            cache = model.make_cache(cache_capacity(model, len(prompt) + max_tokens, compile))
        return TorchBackend(model, cache, seed, compile=compile, block_size=policy.max_size)

    steps = generate_steps(
        model, make_backend, lambda: adaptive_block(model),
        prompt_tokens, eos_token_id, max_tokens, params, use_diffusion, block_size,
    )
    yield from token_ids(steps, stats)


def generate(
    model: Model,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs,
) -> str:
    """The whole generated text (a transformers tokenizer); `kwargs` are `torch_generate`'s."""
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    eos = eos_set(kwargs.pop("eos_token_id", None)) | eos_set(tokenizer.eos_token_id)
    stats = kwargs.pop("stats", None) or DecodeStats()
    tokens = list(torch_generate(model, prompt, eos, max_tokens, stats=stats, **kwargs))
    text = tokenizer.decode([t for t in tokens if t not in eos])
    if verbose:
        print(text)
        print("=" * 10)
        print(f"Generation: {len(tokens)} tokens, {stats.steps} steps, "
              f"{stats.mean_tokens_per_step:.2f} tokens-per-step")
    return text
