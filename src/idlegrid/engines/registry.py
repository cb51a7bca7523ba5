"""Engines by name, or any `Engine` class by import path (`module:Class`).

Each built-in engine is imported only when asked for, so importing this module (and
`idlegrid --help`) never loads torch or llama.cpp.
"""

from __future__ import annotations

import importlib
from typing import Any

from idlegrid.engines.base import Engine
from idlegrid.errors import EngineError

DEFAULT_ENGINE = "llama.cpp"

_BUILTIN = {
    "llama.cpp": "idlegrid.engines.llamacpp:LlamaCppEngine",
    "llamacpp": "idlegrid.engines.llamacpp:LlamaCppEngine",
    "llama_cpp": "idlegrid.engines.llamacpp:LlamaCppEngine",
    "torch": "idlegrid.engines.torch_hf:TorchEngine",
    "transformers": "idlegrid.engines.torch_hf:TorchEngine",
    "fake": "idlegrid.engines.fake:FakeEngine",
    "tiny": "idlegrid.engines.tiny:TinyEngine",
    "minilm": "idlegrid.engines.minilm:MiniLMEngine",
}


def engine_names() -> list[str]:
    """The built-in engine names `load_engine` accepts."""
    return sorted(_BUILTIN)


def load_engine(spec: str | None, model_id: str, **kwargs: Any) -> Engine:
    """Load the engine named by `spec` (a built-in name or `module:Class`) for `model_id`."""
    spec = (spec or DEFAULT_ENGINE).strip()
    target = _BUILTIN.get(spec.lower())
    if target is None:
        if ":" not in spec:
            raise EngineError(
                f"unknown engine {spec!r}: use one of {', '.join(engine_names())} "
                "or a plug-in path 'module:Class'",
                engine=spec,
            )
        target = spec
    cls = _import(target, spec)
    try:
        engine = cls(model_id, **kwargs)
    except EngineError:
        raise
    except Exception as exc:  # a plug-in's own failure, reported with its engine name
        raise EngineError(
            f"engine {spec!r} failed to load {model_id!r}: {exc}", engine=spec, detail=repr(exc)
        ) from exc
    if not isinstance(engine, Engine):
        raise EngineError(f"{target} does not implement the Engine interface", engine=spec)
    return engine


def _import(target: str, spec: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise EngineError(f"engine path {target!r} must look like 'module:Class'", engine=spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineError(
            f"cannot import engine module {module_name!r}: {exc}", engine=spec, detail=repr(exc)
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise EngineError(
                f"module {module_name!r} has no {attr!r}", engine=spec, detail=repr(exc)
            ) from exc
    if not callable(obj):
        raise EngineError(f"{target} is not callable", engine=spec)
    return obj
