"""Engines: the models behind workers, one module per backend, imported on demand."""

from __future__ import annotations

import importlib

from mesh.engines.base import Engine, EngineConfig, EngineError, EngineOutput, EngineStats

#: Backend name -> "module:class". Modules load only when chosen, so a
#: synthetic worker never imports torch.
BACKENDS: dict[str, str] = {
    "transformers": "mesh.engines.transformers_backend:TransformersEngine",
    "vllm": "mesh.engines.vllm_backend:VllmEngine",
    "synthetic": "mesh.engines.synthetic:SyntheticEngine",
}


def create_engine(config: EngineConfig) -> Engine:
    try:
        target = BACKENDS[config.backend]
    except KeyError:
        raise ValueError(f"unknown backend {config.backend!r}; choose from {', '.join(BACKENDS)}") from None
    module_name, class_name = target.split(":")
    engine_class: type[Engine] = getattr(importlib.import_module(module_name), class_name)
    return engine_class(config)


__all__ = ["BACKENDS", "Engine", "EngineConfig", "EngineError", "EngineOutput", "EngineStats", "create_engine"]
