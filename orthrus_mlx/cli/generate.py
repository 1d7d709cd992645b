"""`orthrus-mlx generate`: one prompt in, text out, with mlx-lm's flags."""

import argparse
import sys

from ..distributed import broadcast_text, world
from ..generate import add_special_tokens, generate
from .flags import (
    add_cache_arguments,
    add_chat_template_arguments,
    add_model_arguments,
    add_prompt_cache_file_argument,
    add_sampling_arguments,
    cache_kwargs,
    chat_prompt,
    check_cache_flags,
    command_policy,
    generation_kwargs,
    load_from_args,
    open_prompt_file,
    sampling_params,
    str2bool,
    template_kwargs,
    with_system,
)
from .text_input import check_text, read_all

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--prompt", "-p", default=DEFAULT_PROMPT, help="Message to be processed by the model ('-' reads stdin)"
    )
    add_chat_template_arguments(parser)
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="Use the raw prompt without the tokenizer's chat template",
    )
    add_sampling_arguments(parser, DEFAULT_MAX_TOKENS)
    add_cache_arguments(parser)
    add_prompt_cache_file_argument(parser)
    parser.add_argument(
        "--verbose",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help="Print prompt and generation speed, tokens per step and peak memory",
    )


def run(args: argparse.Namespace) -> int:
    sampling_params(args)
    cache_kwargs(args)
    kwargs = template_kwargs(args)
    check_text(args.system_prompt, "--system-prompt")
    prompt = check_text(args.prompt, "--prompt").replace("\\n", "\n").replace("\\t", "\t")
    if prompt == "-":  # rank 0's stdin, under mlx.launch
        group = world()
        prompt = read_all(sys.stdin, "The prompt on stdin") if group.rank() == 0 else None
        prompt = broadcast_text(prompt, group) if group.size() > 1 else prompt
    model, tokenizer = load_from_args(args)
    check_cache_flags(model, args)
    cached = open_prompt_file(model, args)
    if cached is not None:  # the file's document, then this prompt, as one message (mlx-lm's way)
        prompt = cached.text + prompt
    if not args.ignore_chat_template and tokenizer.has_chat_template:
        messages = with_system(args.system_prompt, [{"role": "user", "content": prompt}])
        prompt = chat_prompt(tokenizer, messages, kwargs)
    elif cached is not None:
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special_tokens(tokenizer, prompt))
    if cached is not None:
        prompt = cached.continue_with(model, prompt)
    text = generate(
        model,
        tokenizer,
        prompt,
        verbose=args.verbose,
        max_tokens=args.max_tokens,
        prompt_cache=None if cached is None else cached.cache,
        **generation_kwargs(args, command_policy(model, args)),
    )
    if not args.verbose:
        print(text, flush=True)
    return 0
