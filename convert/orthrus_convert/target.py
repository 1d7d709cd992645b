"""Where `convert` may write: what `--force` may replace, and a staging folder renamed into place.

`--force` replaces a non-empty --mlx-path only when it is a model folder, so a mistyped path
cannot take a user's files with it. A model folder (one we wrote, or a Hugging Face one):
  - holds config.json and at least one *.safetensors file, and
  - holds nothing but plain files (or links to files) named as a checkpoint's files are:
    MODEL_FILES below. Any subfolder or other file (notes.txt, a script, photos/) makes
    --force refuse, naming it.
The output never overlaps the source, and is never the current folder or one above it.

Staging folders are named `.<target>.convert-<pid>-<random>.partial` beside the target (and
`.old` for the folder being replaced). A run killed with SIGKILL leaves one behind; the next
run for the same target removes those whose process is no longer running on this machine
(and puts a replaced folder back if the kill came between the two renames).
"""

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterator, Optional

# What a checkpoint folder holds: weights, configs, tokenizer files, chat templates, its card.
MODEL_FILES = (
    "*.safetensors", "*.json", "*.jinja", "*.tiktoken", "tokenizer.model", "merges.txt",
    "vocab.txt", "*.md", "LICENSE*", ".gitattributes", ".DS_Store",
)


def not_a_model_folder(folder: Path) -> Optional[str]:
    """Why `folder` is not a model folder that --force may replace; None when it is one."""
    names = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_file():
            return f"holds {entry.name}, which is not a file"
        if not any(fnmatchcase(entry.name, pattern) for pattern in MODEL_FILES):
            return f"holds {entry.name}, which is not a model file"
        names.append(entry.name)
    if "config.json" not in names:
        return "has no config.json"
    if not any(n.endswith(".safetensors") for n in names):
        return "has no *.safetensors weights"
    return None


def check_target(target: Path, source: Path, force: bool) -> None:
    if target.is_symlink():
        raise FileExistsError(f"--mlx-path {target} is a symbolic link; name a folder")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"--mlx-path {target} is a file, not a folder")
    t, s, cwd = target.resolve(), source.resolve(), Path.cwd().resolve()
    if t == cwd or t in cwd.parents:
        raise ValueError(f"--mlx-path {target} is the current folder or holds it; name a new folder")
    if t == s or s in t.parents or t in s.parents:
        raise ValueError(f"--mlx-path {target} overlaps the source checkpoint {source}")
    if not target.exists() or not any(target.iterdir()):
        return
    if not force:
        raise FileExistsError(f"--mlx-path {target} exists and is not empty; pass --force to replace it")
    reason = not_a_model_folder(target)
    if reason:
        raise FileExistsError(
            f"--force replaces only a model folder, and --mlx-path {target} {reason}; "
            "remove it yourself or choose another --mlx-path"
        )


def staging_pattern(target: Path) -> "re.Pattern[str]":
    return re.compile(rf"\.{re.escape(target.name)}\.convert-(\d+)-[a-z0-9_]{{8}}\.(partial|old)")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_staging(target: Path) -> None:
    """Remove the staging folders of killed runs for `target`; never those of a running one."""
    if not target.parent.is_dir():
        return
    pattern = staging_pattern(target)
    for entry in sorted(target.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir() or process_alive(int(match.group(1))):
            continue
        if match.group(2) == "old" and not target.exists():
            os.rename(entry, target)  # killed between the two renames: the old folder goes back
        else:
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def staging_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """A hidden temporary folder beside `target`, renamed to it only on success.

    Whatever stops the body (an error, Ctrl-C) removes the temporary folder, so an
    interrupted run never leaves a folder that looks like a converted model.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.convert-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if not replace and any(target.iterdir()):
                raise FileExistsError(f"{target} appeared during the conversion; not replacing it")
            old = tmp.with_suffix(".old")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
