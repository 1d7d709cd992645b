"""Token generation with the PyTorch backend: the same options and output as `mlx_generate`."""

from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from ..core.costs import CONTEXT, adaptive_policy, machine_key, remembering
from ..core.policy import AdaptiveBlock, block_policy
from ..core.sampling import SamplingParams
from ..core.step import DecodeStats, as_token_list, decode, eos_set, per_model
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


def adaptive_block(model: Model) -> AdaptiveBlock:
    """The adaptive policy over this machine's measured step costs for `model` on its device,
    one per model object (acceptance statistics carry over between generations and processes)."""
    K = model.block_size
    weight = model.model.embed_tokens.weight
    device = torch.cuda.get_device_name(weight.device) if weight.is_cuda else "cpu"
    key = machine_key("torch", torch.__version__, device, repr(model.args), str(weight.dtype))
    make = lambda: TorchBackend(model, model.make_cache(cache_capacity(model, CONTEXT + K)), None)
    return per_model(model, "_adaptive_block", lambda: adaptive_policy(key, weights_fingerprint(model), make, K))


def weights_fingerprint(model: Model) -> str:
    """A few weights of both views, so that two checkpoints of one shape learn apart."""
    first, last = model.model.layers[0].self_attn, model.model.layers[-1].self_attn
    sample = [first.q_proj.weight, first.q_proj_diff.weight, last.o_proj_diff.weight]
    return repr([w[0, :8].float().tolist() for w in sample])


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
    block_size: Union[int, str, None] = None,
    prompt_cache: Optional[KVCache] = None,
    stats: Optional[DecodeStats] = None,
    compile: bool = False,
) -> Iterator[int]:
    """Yield accepted token ids one at a time; output is exactly the base model's.

    `eos_token_id` (an int or a list) is joined with the EOS ids of the model's config.
    `prompt_cache` (from `model.make_cache(capacity)`) may already hold earlier tokens;
    then `prompt_tokens` are only the new ones. `compile` runs the per-step passes through
    torch.compile (CUDA graphs on a GPU); each new cache capacity compiles once, so reuse a
    `prompt_cache` (`cache.reset()`) across generations.
    """
    params = SamplingParams(temperature, top_p, top_k, seed)
    block_size = block_policy(
        block_size, use_diffusion and model.has_diffusion, model.block_size, lambda: adaptive_block(model)
    )
    prompt = as_token_list(prompt_tokens)
    cache = prompt_cache
    if cache is None:
        cache = model.make_cache(cache_capacity(model, len(prompt) + max_tokens, compile))
    longest = block_size if isinstance(block_size, int) else block_size.max_size
    backend = TorchBackend(model, cache, seed, compile=compile, block_size=longest)
    eos = eos_set(eos_token_id) | eos_set(model.args.eos_token_id)
    tokens = decode(
        backend,
        prompt,
        max_tokens=max_tokens,
        eos_token_id=eos,
        params=params,
        block_size=block_size,
        stats=stats,
    )
    yield from remembering(tokens, block_size)


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
