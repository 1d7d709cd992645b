"""A deliberately naive Orthrus in numpy (float64, explicit per-head loops).

Written from docs/DESIGN.md (sections 1-3) alone, sharing no code with the package, so that the
MLX and PyTorch models can be checked against it. Qwen3 (q/k norms) and Llama
(none: the weights simply lack them); rotary in the Hugging Face half-split
layout, or llama.cpp's interleaved one (`"rope_interleaved": True`) for Q/K rows
as a GGUF file stores them.
"""

import itertools
import math

import numpy as np


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x, positions, theta, interleaved=False):
    """RoPE on [T, D] at the given absolute positions: pair i is (x[i], x[i + D/2]) in the
    rotate-half layout, (x[2i], x[2i + 1]) in the interleaved one."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    if interleaved:
        x1, x2 = x[:, 0::2], x[:, 1::2]
        out = np.empty_like(x)
        out[:, 0::2], out[:, 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return out
    x1, x2 = x[:, :half], x[:, half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Float64:
    """Weights read as float64 when used: any mapping of names to arrays (a lazy one too)."""

    def __init__(self, weights):
        self.weights = weights

    def __contains__(self, name):
        return name in self.weights

    def __getitem__(self, name):
        return np.asarray(self.weights[name], dtype=np.float64)


class NaiveOrthrus:
    def __init__(self, config, weights):
        self.c = config
        self.w = Float64(weights)

    def project(self, layer, x, positions, view):
        """Per-head q, k, v lists for hidden states x [T, D] through one view."""
        c, w, p = self.c, self.w, f"model.layers.{layer}.self_attn."
        hd, eps = c["head_dim"], c["rms_norm_eps"]
        q = x @ w[f"{p}q_proj{view}.weight"].T
        k = x @ w[f"{p}k_proj{view}.weight"].T
        v = x @ w[f"{p}v_proj{view}.weight"].T

        def norm(name, head):  # Qwen3 normalises each head; Llama has no such weights
            key = f"{p}{name}{view}.weight"
            return rms_norm(head, w[key], eps) if key in w else head

        def rotate(head):
            return rope(head, positions, c["rope_theta"], c.get("rope_interleaved", False))

        qs, ks, vs = [], [], []
        for h in range(c["num_attention_heads"]):
            qs.append(rotate(norm("q_norm", q[:, h * hd : (h + 1) * hd])))
        for h in range(c["num_key_value_heads"]):
            ks.append(rotate(norm("k_norm", k[:, h * hd : (h + 1) * hd])))
            vs.append(v[:, h * hd : (h + 1) * hd])
        return qs, ks, vs

    def attend(self, layer, qs, keys, values, allowed, view):
        """allowed[i, j]: query i may see key j."""
        c, w = self.c, self.w
        group = c["num_attention_heads"] // c["num_key_value_heads"]
        heads = []
        for h, q in enumerate(qs):
            k, v = keys[h // group], values[h // group]
            scores = q @ k.T / np.sqrt(c["head_dim"])
            scores = np.where(allowed, scores, -np.inf)
            heads.append(softmax(scores) @ v)
        out = np.concatenate(heads, axis=-1)
        return out @ w[f"model.layers.{layer}.self_attn.o_proj{view}.weight"].T

    def mlp_block(self, layer, h):
        w, p, eps = self.w, f"model.layers.{layer}.", self.c["rms_norm_eps"]
        x = rms_norm(h, w[f"{p}post_attention_layernorm.weight"], eps)
        gate = x @ w[f"{p}mlp.gate_proj.weight"].T
        up = x @ w[f"{p}mlp.up_proj.weight"].T
        return h + (gate / (1 + np.exp(-gate)) * up) @ w[f"{p}mlp.down_proj.weight"].T

    def logits(self, h):
        w = self.w
        h = rms_norm(h, w["model.norm.weight"], self.c["rms_norm_eps"])
        head = w["model.embed_tokens.weight"] if self.c["tie_word_embeddings"] else w["lm_head.weight"]
        return h @ head.T

    def ar(self, tokens):
        """Causal AR logits [T, V] and each layer's (keys, values) per KV head."""
        T = len(tokens)
        h = self.w["model.embed_tokens.weight"][tokens]
        cache = []
        for layer in range(self.c["num_hidden_layers"]):
            x = rms_norm(h, self.w[f"model.layers.{layer}.input_layernorm.weight"], self.c["rms_norm_eps"])
            qs, ks, vs = self.project(layer, x, range(T), "")
            cache.append((ks, vs))
            causal = np.tril(np.ones((T, T), dtype=bool))
            h = h + self.attend(layer, qs, ks, vs, causal, "")
            h = self.mlp_block(layer, h)
        return self.logits(h), cache

    def draft(self, prefix, block):
        """Diffusion logits [K, V] for `block` at positions len(prefix)..; non-causal."""
        n, K = len(prefix), len(block)
        _, cache = self.ar(prefix)
        h = self.w["model.embed_tokens.weight"][block]
        for layer in range(self.c["num_hidden_layers"]):
            x = rms_norm(h, self.w[f"model.layers.{layer}.input_layernorm.weight"], self.c["rms_norm_eps"])
            qs, ks, vs = self.project(layer, x, range(n, n + K), "_diff")
            cached_k, cached_v = cache[layer]
            keys = [np.concatenate([ck, k]) for ck, k in zip(cached_k, ks)]
            values = [np.concatenate([cv, v]) for cv, v in zip(cached_v, vs)]
            everything = np.ones((K, n + K), dtype=bool)
            h = h + self.attend(layer, qs, keys, values, everything, "_diff")
            h = self.mlp_block(layer, h)
        return self.logits(h)


def processed(logits, temperature, top_k, top_p):
    """Temperature, top-k, top-p as plain numpy: the independent version."""
    p = softmax(logits / temperature)
    if top_k:
        p = np.where(p >= np.sort(p)[-top_k], p, 0.0)
        p /= p.sum()
    if top_p < 1:
        mass_above = np.array([p[p > x].sum() for x in p])
        p = np.where(mass_above < top_p, p, 0.0)
        p /= p.sum()
    return p


def chi_square_p(observed, expected: dict, draws: int) -> float:
    """p-value of Pearson's chi-square, pooling cells expected below 5 (Wilson-Hilferty)."""
    stat, cells, pool_obs, pool_exp = 0.0, 0, 0, 0.0
    for cell, p in expected.items():
        e = p * draws
        if e < 5:
            pool_obs, pool_exp = pool_obs + observed[cell], pool_exp + e
        else:
            stat, cells = stat + (observed[cell] - e) ** 2 / e, cells + 1
    if pool_exp > 0:
        stat, cells = stat + (pool_obs - pool_exp) ** 2 / max(pool_exp, 1e-9), cells + 1
    k = cells - 1
    assert k >= 3, "too few cells for a meaningful test"
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def exact_distribution(naive, prompt, length, vocab, **processing):
    """P(continuation | prompt) for every continuation of `length` tokens, by enumeration."""
    probs = {}
    for seq in itertools.product(range(vocab), repeat=length):
        logits, _ = naive.ar(np.array(list(prompt) + list(seq[:-1])))
        steps = logits[len(prompt) - 1 :]
        probs[seq] = math.prod(processed(steps[i], **processing)[seq[i]] for i in range(length))
    return probs
