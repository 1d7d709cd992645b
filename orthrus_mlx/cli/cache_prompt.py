"""`orthrus-mlx cache-prompt`: prefill a long document once and save its KV cache to a file.

As `mlx_lm.cache_prompt`: the document is the start of a user message (chat template) or of the
raw prompt; `generate --prompt-cache-file FILE --prompt TEXT` (or `chat`) continues it with TEXT.
"""

import argparse
import sys
import time

import mlx.core as mx

from .. import prompt_file
from ..backend import MLXBackend
from ..core.sampling import SamplingParams
from ..generate import add_special_tokens
from ..kv_cache import CacheOptions, make_cache
from .flags import (
    add_cache_arguments,
    add_chat_template_arguments,
    add_model_arguments,
    cache_kwargs,
    check_template_args,
    load_from_args,
    template_kwargs,
    with_system,
)
from .text_input import check_text, read_all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt-cache-file", required=True, help="The file to save the prompt cache in")
    parser.add_argument("--prompt", "-p", required=True, help="The document to prefill ('-' reads stdin)")
    add_chat_template_arguments(parser)
    parser.add_argument(
        "--ignore-chat-template", action="store_true", help="Cache the raw text, without the chat template"
    )
    add_cache_arguments(parser)


def document_tokens(tokenizer, text: str, system_prompt, template, raw: bool):
    """The ids of `text` as the open start of a user message (or of a raw prompt)."""
    if raw or not tokenizer.has_chat_template:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens(tokenizer, text))
    rendered = tokenizer.apply_chat_template(
        with_system(system_prompt, [{"role": "user", "content": text}]),
        tokenize=False, continue_final_message=True, **check_template_args(template),
    )
    return tokenizer.encode(rendered, add_special_tokens=False)


def run(args: argparse.Namespace) -> int:
    options = CacheOptions(**cache_kwargs(args))
    text = check_text(args.prompt, "--prompt")
    if text == "-":
        text = read_all(sys.stdin, "The prompt on stdin")
    model, tokenizer = load_from_args(args)
    options.check_head_dim(model)
    tokens = document_tokens(tokenizer, text, args.system_prompt, template_kwargs(args), args.ignore_chat_template)
    cache = make_cache(model, args.max_kv_size)
    tic = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"\rProcessed {done:6d} of {total} tokens ({done / (time.perf_counter() - tic):.1f} tok/s)",
              end="", file=sys.stderr, flush=True)

    MLXBackend(model, cache, progress=progress, options=options).prefill(tokens, SamplingParams())
    mx.eval([c.state for c in cache])
    print(file=sys.stderr)
    prompt_file.save(args.prompt_cache_file, cache, tokens, text, model, args.model or "")
    print(f"Saved {len(tokens)} tokens to {args.prompt_cache_file} "
          f"(peak memory {mx.get_peak_memory() / 1e9:.3f} GB)", file=sys.stderr)
    return 0
