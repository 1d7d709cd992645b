"""The PyTorch backend of the shared decoding step (`orthrus_mlx.core.step.Backend`).

It supplies the model passes, the cache trim and the sampling arithmetic; drafting,
verifying, accepting and committing are `orthrus_mlx.core.step`'s. Sampling is the MLX
backend's, operation for operation: temperature, then top-k, then top-p, renormalised.
"""

from typing import Callable, Optional, Sequence, Tuple

import torch

from ..core.sampling import SamplingParams
from ..core.step import Scores
from .cache import KVCache
from .model import Model

PREFILL_STEP_SIZE = 2048


def apply_top_k(logprobs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep exactly the top_k most likely tokens (as mlx-lm's apply_top_k)."""
    kept = logprobs.topk(top_k, dim=-1).indices
    masked = torch.full_like(logprobs, -float("inf"))
    return masked.scatter(-1, kept, logprobs.gather(-1, kept))


def apply_top_p(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop the tokens whose mass above them is >= top_p (as mlx-lm's apply_top_p)."""
    sorted_logprobs = logprobs.sort(dim=-1).values
    sorted_probs = sorted_logprobs.float().exp()
    mass_above = sorted_probs.flip(-1).cumsum(-1).flip(-1) - sorted_probs
    total_mass = mass_above[..., :1] + sorted_probs[..., :1]
    num_dropped = (mass_above >= top_p * total_mass).sum(dim=-1, keepdim=True)
    threshold = sorted_logprobs.gather(-1, num_dropped)
    return logprobs.masked_fill(logprobs < threshold, -float("inf"))


def log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p; the same processing for both views."""
    logprobs = torch.log_softmax(logits.float() / params.temperature, dim=-1)
    if 0 < params.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, params.top_k)
    if params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    return torch.log_softmax(logprobs, dim=-1)


def categorical(logprobs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row from (unnormalised) log-weights, without a host sync (w / Exp(1) argmax)."""
    noise = torch.empty_like(logprobs).exponential_(generator=generator)
    return (logprobs.exp() / noise).argmax(dim=-1)


class TorchBackend:
    """The model passes of one generation over a preallocated KV cache.

    `compile=True` runs the passes of length 1 and `block_size` through torch.compile over
    the whole cache (fixed shapes; CUDA graphs on a GPU); prefill and the one shorter step
    at the end of a generation run eagerly rather than compiling a shape used once.
    """

    def __init__(
        self,
        model: Model,
        cache: KVCache,
        seed: Optional[int] = None,
        compile: bool = False,
        block_size: Optional[int] = None,
    ):
        self.model = model
        self.cache = cache
        self.vocab_size = model.args.vocab_size
        self.max_positions = min(model.args.max_position_embeddings, cache.capacity)
        self.device = model.model.embed_tokens.weight.device
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.compiled: Optional[Callable] = None
        self.compiled_lengths = {1, block_size or model.block_size or 1}
        if compile:
            if self.device.type == "cuda":
                cache.mark_static()
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.compiled = torch.compile(model.forward_cached, mode=mode, dynamic=False)

    def run(self, tokens: Sequence[int], diffusion: bool, drafted: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One pass of `tokens` (then `drafted`) at positions offset ...; logits [T, V]."""
        ids = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)
        if drafted is not None:
            ids = torch.cat([ids, drafted])
        n, length = self.cache.offset, ids.shape[0]
        self.cache.check_room(length)
        positions = torch.arange(n, n + length, device=self.device)
        with torch.inference_mode():
            if self.compiled is not None and length in self.compiled_lengths:
                if self.device.type == "cuda":
                    # Each call is a new CUDA-graph iteration: the previous outputs were consumed.
                    torch.compiler.cudagraph_mark_step_begin()
                return self.compiled(ids[None], positions, self.cache, diffusion, self.cache.capacity)[0]
            return self.model.forward_cached(ids[None], positions, self.cache, diffusion, n + length)[0]

    def sample(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        if params.greedy:
            return logits.argmax(dim=-1)
        return categorical(log_probs(logits, params), self.generator)

    def prefill(self, tokens: Sequence[int], params: SamplingParams) -> int:
        if params.has_processors or params.min_p > 0:
            raise ValueError(
                "min_p, repetition/presence/frequency penalties and logit_bias are not supported by "
                "the PyTorch backend; use the MLX backend."
            )
        tokens = list(tokens)
        with torch.inference_mode():
            while len(tokens) > PREFILL_STEP_SIZE:
                self.model.step(self.as_ids(tokens[:PREFILL_STEP_SIZE]), self.cache)
                tokens = tokens[PREFILL_STEP_SIZE:]
            logits = self.model.step(self.as_ids(tokens), self.cache)[0, -1]
            return int(self.sample(logits, params).item())

    def as_ids(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=self.device)

    def draft(self, token: int, length: int, params: SamplingParams) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        block = [token] + [self.model.mask_token_id] * (length - 1)
        logits = self.run(block, diffusion=True)[:-1]
        if params.greedy:
            return self.sample(logits, params), None
        q = log_probs(logits, params)
        return categorical(q, self.generator), q

    def verify(self, token: int, drafted, params: SamplingParams) -> Scores:
        d, q = drafted if drafted is not None else (None, None)
        logits = self.run([token], diffusion=False, drafted=d)
        self.cache.offset += logits.shape[0]
        n_draft = logits.shape[0] - 1
        if params.greedy:
            target = self.sample(logits, params)
            host = (target if d is None else torch.cat([d, target])).tolist()
            return Scores(host[:n_draft], host[n_draft:])

        p = log_probs(logits, params)
        if q is None:
            return Scores([], categorical(p, self.generator).tolist())
        p_d = p[:-1].gather(-1, d[:, None])[:, 0]
        q_d = q.gather(-1, d[:, None])[:, 0]
        ratio = (p_d - q_d).exp()
        # A bonus candidate for every possible rejection point, drawn at once;
        # the host keeps the one at the first rejection.
        residual = (p[:-1].exp() - q.exp()).clamp(min=0.0)
        has_mass = residual.sum(dim=-1, keepdim=True) > 0
        residual = torch.where(has_mass, residual.log(), p[:-1])
        target = categorical(torch.cat([residual, p[-1:]]), self.generator)
        # One transfer for the whole step: token ids are exact in float64.
        host = torch.cat([d.double(), target.double(), ratio.double()]).tolist()
        d_host = [int(t) for t in host[:n_draft]]
        target_host = [int(t) for t in host[n_draft : 2 * n_draft + 1]]
        return Scores(d_host, target_host, host[2 * n_draft + 1 :])

    def trim(self, n: int) -> None:
        self.cache.trim(n)

    def cache_length(self) -> int:
        return self.cache.offset
