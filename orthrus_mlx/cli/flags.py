"""The flags `generate`, `chat`, `server` and `bench` share, defined once, and what they map onto.

Every option is spelled the same way in every command, as in mlx-lm.
"""

import argparse
import json
from typing import Any, Dict, List, Optional, Union

from .. import prompt_file
from ..backend import adaptive_block
from ..core.costs import user_store
from ..core.dtypes import DTYPE_NAMES
from ..core.sampling import GREEDY_TEMPERATURE, SamplingParams
from ..kv_cache import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_PREFILL_STEP_SIZE,
    DEFAULT_QUANTIZED_KV_START,
    KV_BITS,
    CacheOptions,
    check_rotating,
    drafts,
    make_cache,
)
from ..loader import DEFAULT_MODEL, load


def str2bool(value: str) -> bool:
    return value.lower() not in ("false", "f", "0", "no")


def block_size(value: str):
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {value!r}")
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {value!r}")
    return size


def json_object(value: str) -> Dict[str, Any]:
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, RecursionError) as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})")
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError('expected a JSON object, e.g. \'{"enable_thinking": false}\'')
    return parsed


# The chat template variables a flag or a request may set. Every other keyword of
# apply_chat_template (chat_template, tokenize, add_generation_prompt, tools, ...) would
# change which template runs or what it returns, so none of them is passed through.
TEMPLATE_VARIABLES = ("enable_thinking",)


def check_template_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """`args` if every name is a known template variable with a JSON scalar value; ValueError if not."""
    for name, value in args.items():
        if name not in TEMPLATE_VARIABLES:
            raise ValueError(
                f"chat template argument {name!r} is not allowed (allowed: {', '.join(TEMPLATE_VARIABLES)})"
            )
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"chat template argument {name!r} must be a string, number, boolean or null")
    return args


def template_variables(value: str) -> Dict[str, Any]:
    try:
        return check_template_args(json_object(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help=f"Local model folder, Hugging Face repo or GGUF file (default: the shipped {DEFAULT_MODEL.name})",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="Cast the weights; a quantized model is dequantized (default: as stored)",
    )
    parser.add_argument(
        "--drafter",
        default=None,
        help="Drafter adapter folder or Hugging Face repo: its diffusion view is applied to --model",
    )
    parser.add_argument(
        "--adapter-path",
        default=None,
        help="mlx-lm LoRA adapter folder (adapter_config.json + adapters.safetensors) applied to the base",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument(
        "--max-tokens", "-m", type=int, default=max_tokens, help="Maximum number of tokens to generate"
    )
    parser.add_argument("--temp", type=float, default=0.0, help="Sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="Sampling top-p (1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="Sampling top-k (0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="Sampling min-p (0: off)")
    parser.add_argument(
        "--min-tokens-to-keep", type=int, default=1, help="Minimum tokens to keep for min-p sampling"
    )
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed")
    parser.add_argument(
        "--repetition-penalty", type=float, default=0.0, help="Repetition penalty, e.g. 1.1 (0: off)"
    )
    parser.add_argument(
        "--repetition-context-size", type=int, default=20, help="Tokens the repetition penalty looks back on"
    )
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="Presence penalty (0: off)")
    parser.add_argument(
        "--presence-context-size", type=int, default=20, help="Tokens the presence penalty looks back on"
    )
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="Frequency penalty (0: off)")
    parser.add_argument(
        "--frequency-context-size", type=int, default=20, help="Tokens the frequency penalty looks back on"
    )
    parser.add_argument(
        "--logit-bias",
        type=json_object,
        default=None,
        help='Additive logit biases by token id, as a JSON object, e.g. \'{"42": 5.0}\'',
    )
    parser.add_argument(
        "--extra-eos-token",
        action="extend",
        nargs="+",
        default=[],
        help="Tokens (text or id) that also end generation; repeatable",
    )
    parser.add_argument(
        "--no-diffusion",
        action="store_true",
        help="Plain autoregressive decoding, no diffusion drafting (same output, slower)",
    )
    parser.add_argument(
        "--block-size",
        type=block_size,
        default=None,
        help="Draft block length, or 'auto' to pick it step by step from this machine's measured "
        "step costs and the running acceptance (default: auto; the checkpoint's with --seed and "
        "--temp > 0, so that the seed reproduces the sample)",
    )


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """mlx-lm's KV cache and prefill flags, spelled and defaulted as mlx-lm spells them."""
    parser.add_argument(
        "--kv-bits", type=int, choices=KV_BITS, default=None,
        help="Quantize the KV cache to this many bits (default: no quantization)",
    )
    parser.add_argument(
        "--kv-group-size", type=int, default=DEFAULT_KV_GROUP_SIZE,
        help=f"Group size for KV cache quantization (default: {DEFAULT_KV_GROUP_SIZE})",
    )
    parser.add_argument(
        "--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START,
        help="With --kv-bits, quantize the cache once it holds this many tokens "
        f"(default: {DEFAULT_QUANTIZED_KV_START})",
    )
    parser.add_argument(
        "--max-kv-size", type=int, default=None,
        help="Bound the KV cache to this many tokens (a rotating cache; needs --block-size 1)",
    )
    parser.add_argument(
        "--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE,
        help=f"Prefill the prompt in chunks of this many tokens (default: {DEFAULT_PREFILL_STEP_SIZE})",
    )


def add_prompt_cache_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt-cache-file",
        default=None,
        help="A file from `orthrus-mlx cache-prompt`: its document, already prefilled, starts the prompt",
    )


def open_prompt_file(model, args: argparse.Namespace):
    """The --prompt-cache-file's contents, checked against the model and the cache flags; None without one."""
    if getattr(args, "prompt_cache_file", None) is None:
        return None
    group_size = args.kv_group_size if args.kv_bits is not None else None
    return prompt_file.load(args.prompt_cache_file, model, args.kv_bits, group_size)


CACHE_FLAGS = {
    "kv_bits": None,
    "kv_group_size": DEFAULT_KV_GROUP_SIZE,
    "quantized_kv_start": DEFAULT_QUANTIZED_KV_START,
    "max_kv_size": None,
    "prefill_step_size": DEFAULT_PREFILL_STEP_SIZE,
}


def cache_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The cache flags as `mlx_generate` options, checked (ValueError) before the model loads."""
    kwargs = {name: getattr(args, name, default) for name, default in CACHE_FLAGS.items()}
    CacheOptions(**kwargs)
    return kwargs


def check_cache_flags(model, args: argparse.Namespace) -> None:
    """A bounded cache with drafting is refused at start, not at the first answer."""
    flag = command_block_size(args.block_size, args.temp, args.seed)
    CacheOptions(**cache_kwargs(args)).check_head_dim(model)
    if getattr(args, "max_kv_size", None) is not None:
        check_rotating(make_cache(model, 1), drafts(model, not args.no_diffusion, flag))


def add_chat_template_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--system-prompt", default=None, help="System prompt to be used for the chat template"
    )
    parser.add_argument(
        "--chat-template-args",
        "--chat-template-config",
        dest="chat_template_args",
        type=template_variables,
        default=None,
        help="Chat template variables, as a JSON object, e.g. '{\"enable_thinking\": false}' "
        f"(allowed: {', '.join(TEMPLATE_VARIABLES)})",
    )
    parser.add_argument(
        "--enable-thinking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Qwen3 thinking on or off (default: the template's own default)",
    )


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """Check the sampling flags before the (slow) model load; raises ValueError."""
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be in [0, 2**64), got {args.seed}")
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    return SamplingParams(args.temp, args.top_p, args.top_k, args.seed, **processing_kwargs(args))


# The SamplingParams fields past temperature, top_p, top_k and seed; each is a flag of the same name.
PROCESSING = (
    "min_p", "min_tokens_to_keep", "repetition_penalty", "repetition_context_size", "presence_penalty",
    "presence_context_size", "frequency_penalty", "frequency_context_size", "logit_bias",
)


def processing_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """min-p and the logits processors' flags, as `mlx_generate` keywords (off where `args`,
    built by hand, lacks them)."""
    off = SamplingParams()
    return {name: getattr(args, name, getattr(off, name)) for name in PROCESSING}


def add_extra_eos(tokenizer, tokens: List[str]) -> None:
    """`--extra-eos-token`: mlx-lm's `add_eos_token` (an id, or a token of the vocabulary)."""
    for token in tokens:
        tokenizer.add_eos_token(token)


def command_block_size(flag: Union[int, str, None], temperature: float, seed: Optional[int], auto: Any = "auto"):
    """The commands' block length: `auto` (the command's adaptive policy) unless one is given,
    or unless a seeded sample must reproduce (the draws follow the block schedule, which
    `auto` picks from timings)."""
    if flag is None:
        flag = None if temperature >= GREEDY_TEMPERATURE and seed is not None else "auto"
    return auto if flag == "auto" else flag


def command_policy(model, args: argparse.Namespace) -> Any:
    """The commands' `auto`: one adaptive policy for all the process's generations, over step
    costs kept in the user's cache folder (measured by a machine's first run only)."""
    block_size = command_block_size(args.block_size, args.temp, args.seed)
    if args.no_diffusion or not model.has_diffusion or block_size != "auto":
        return "auto"  # not used by the flags' own generations: measure nothing now
    return adaptive_block(model, user_store())


def generation_kwargs(args: argparse.Namespace, auto: Any = "auto") -> Dict[str, Any]:
    """The `mlx_generate` options the sampling flags map onto (`auto`: see `command_policy`)."""
    return dict(
        temperature=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        **processing_kwargs(args),
        use_diffusion=not args.no_diffusion,
        block_size=command_block_size(args.block_size, args.temp, args.seed, auto),
        **cache_kwargs(args),
    )


def template_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    kwargs = dict(args.chat_template_args or {})
    if args.enable_thinking is not None:
        kwargs["enable_thinking"] = args.enable_thinking
    return kwargs


def load_from_args(args: argparse.Namespace, **kwargs: Any):
    model, tokenizer = load(
        args.model or DEFAULT_MODEL, dtype=args.dtype, drafter=args.drafter,
        adapter_path=getattr(args, "adapter_path", None), **kwargs,
    )
    add_extra_eos(tokenizer, getattr(args, "extra_eos_token", []))
    return model, tokenizer


def chat_text(tokenizer, messages: List[Dict[str, Any]], template_args: Dict[str, Any], **extra: Any) -> str:
    """The chat template's rendering of `messages`, ready for the assistant's answer; `extra`:
    variables the caller has checked itself (the server's `tools`, `tool_choice`)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **check_template_args(template_args), **extra
    )


def chat_prompt(
    tokenizer, messages: List[Dict[str, Any]], template_args: Dict[str, Any]
) -> List[int]:
    """The token ids of `chat_text`; a template that fails is one ValueError line, not a traceback."""
    try:
        text = chat_text(tokenizer, messages, template_args)
    except Exception as e:  # the template raised (raise_exception), does not parse, or was misused
        raise ValueError(f"The chat template failed: {' '.join(str(e).split())}") from e
    return tokenizer.encode(text, add_special_tokens=False)


def with_system(system_prompt: Optional[str], messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    if system_prompt is None:
        return list(messages)
    return [{"role": "system", "content": system_prompt}] + list(messages)
