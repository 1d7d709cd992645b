"""The commands: `orthrus-mlx <command>` (or `python -m orthrus_mlx <command>`).

Each command is a module with `add_arguments(parser)` and `run(args) -> int`,
imported only when that command runs.
"""

import argparse
import contextlib
import importlib
import importlib.metadata
import os
import sys
import warnings
from typing import Iterator, List, Optional

COMMANDS = {
    "generate": ("orthrus_mlx.cli.generate", "Generate text from a prompt"),
    "chat": ("orthrus_mlx.cli.chat", "Chat in the terminal, reusing the KV cache across turns"),
    "server": ("orthrus_mlx.cli.server", "OpenAI-compatible HTTP server"),
    "cache-prompt": ("orthrus_mlx.cli.cache_prompt", "Prefill a long prompt once and save its KV cache to a file"),
    "convert": ("orthrus_convert.cli", "Convert a Hugging Face checkpoint to MLX"),
    "bench": ("orthrus_mlx.cli.bench", "Benchmark diffusion drafting against plain decoding"),
}


class ArgumentParser(argparse.ArgumentParser):
    """Bad flags give one line on stderr and exit status 2, not the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def top_level_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="orthrus-mlx",
        description="Exact, diffusion-drafted decoding of Orthrus (Qwen3) models on MLX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<10} {help}" for name, (_, help) in COMMANDS.items())
        + "\n\nRun `orthrus-mlx <command> --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="command", help="one of those below")
    return parser


def version() -> str:
    """The installed distribution's version; the source tree's when run uninstalled."""
    try:
        return importlib.metadata.version("orthrus-mlx")
    except importlib.metadata.PackageNotFoundError:
        from .. import __version__

        return __version__


@contextlib.contextmanager
def rank_zero_output() -> Iterator[None]:
    """Under `mlx.launch` only rank 0 prints: the other ranks' stdout and warnings go nowhere
    (errors still reach stderr, from whichever rank meets them)."""
    from ..distributed import is_primary

    if is_primary():
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = top_level_parser()
    if not argv:  # a bare `orthrus-mlx`: say what there is to run
        parser.print_help()
        return 0
    top = parser.parse_args(argv[:1])
    name = top.command
    prog = f"orthrus-mlx {name}"
    module_name, help = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        print(f"{prog}: error: not available in this installation ({e})", file=sys.stderr)
        return 2

    parser = ArgumentParser(prog=prog, description=help)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        with rank_zero_output():
            return module.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `orthrus-mlx generate ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:  # bad values, missing model folders: one line, no traceback
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1

