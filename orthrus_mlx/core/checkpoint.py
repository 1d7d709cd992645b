"""The pure-python side of a Hugging Face checkpoint folder: config, EOS ids, shards, headers.

Shared by the MLX and PyTorch loaders, so it imports neither mlx nor torch.
"""

import json
import struct
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

# The diffusion view's tensors in each layer's self_attn (docs/DESIGN.md section 1).
DIFFUSION_PARAMS = (
    "q_proj_diff",
    "k_proj_diff",
    "v_proj_diff",
    "o_proj_diff",
    "q_norm_diff",
    "k_norm_diff",
)
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model", "README.md"]


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


def is_diffusion_tensor(name: str) -> bool:
    return name.split(".")[-2] in DIFFUSION_PARAMS


def check_orthrus_fields(args: Any) -> None:
    """Warn once for a plain base config; reject unusable block_size / mask_token_id."""
    if not args.has_diffusion:
        warnings.warn(
            "The config has no block_size/mask_token_id: this is a plain Qwen3/Llama "
            "model, running in AR mode without diffusion drafting (a drafter adapter adds it).",
            stacklevel=4,
        )
        return
    if args.block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {args.block_size}")
    if not 0 <= args.mask_token_id < args.vocab_size:
        raise ValueError(
            f"mask_token_id {args.mask_token_id} is outside the vocabulary [0, {args.vocab_size})"
        )


def tensor_shapes(files: List[Path]) -> Dict[str, List[int]]:
    """Every tensor's shape across the shards, from the headers alone."""
    shapes = {}
    for f in files:
        shapes.update({k: v["shape"] for k, v in read_safetensors_header(f).items()})
    return {k: v for k, v in shapes.items() if "rotary_emb.inv_freq" not in k}


def check_diffusion_config(args: Any, names: Iterable[str]) -> None:
    if not args.has_diffusion and any(is_diffusion_tensor(k) for k in names):
        raise ValueError(
            "The checkpoint has diffusion tensors (*_proj_diff) but its config.json "
            "lacks block_size and/or mask_token_id."
        )


def check_tensor_shapes(args: Any, expected: Dict[str, List[int]], given: Dict[str, List[int]]) -> None:
    """Name every missing, unexpected or misshapen tensor before loading any data."""
    given = dict(given)
    if args.tie_word_embeddings:
        given.pop("lm_head.weight", None)
    if not args.has_diffusion:
        expected = {k: v for k, v in expected.items() if not is_diffusion_tensor(k)}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing:
        raise ValueError(f"Missing tensors in the checkpoint: {missing[:10]}")
    if extra:
        raise ValueError(f"Unexpected tensors in the checkpoint: {extra[:10]}")
    for name, shape in given.items():
        if list(shape) != list(expected[name]):
            raise ValueError(
                f"Tensor {name} has shape {tuple(shape)}, expected {tuple(expected[name])}"
            )
