"""The pure-python side of a Hugging Face checkpoint folder: config, EOS ids, shards, headers.

Shared by the MLX and PyTorch loaders, so it imports neither mlx nor torch.
"""

import json
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]


def resolve_model_path(path_or_repo: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local folder as is; anything else is fetched from the Hugging Face Hub."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"Expected a model folder, got a file: {path}")
        return path
    repo = str(path_or_repo)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise FileNotFoundError(f"No model folder at {path}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # the hub's own errors say little about what was asked for
        raise FileNotFoundError(
            f"No local folder {path} and could not fetch '{repo}' from the Hugging Face Hub: {e}"
        ) from e


def read_config(model_path: Path) -> Dict[str, Any]:
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in {model_path}")
    with open(config_file) as f:
        config = json.load(f)
    eos = eos_list(config.get("eos_token_id"))
    generation_file = model_path / "generation_config.json"
    if generation_file.is_file():
        with open(generation_file) as f:
            eos += eos_list(json.load(f).get("eos_token_id"))
    config["eos_token_id"] = sorted(set(eos))
    return config


def eos_list(value: Union[int, Iterable[int], None]) -> List[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def weight_files(model_path: Path) -> List[Path]:
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [model_path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"Shards listed in {index} are missing: {missing}")
        return files
    files = sorted(model_path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No model*.safetensors in {model_path}")
    return files


def read_safetensors_header(path: Path) -> Dict[str, Any]:
    """The tensor names, dtypes and shapes of a safetensors file, without its data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} is past the end of the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"Corrupt safetensors header in {path}: {e}") from e
    header.pop("__metadata__", None)
    return header
