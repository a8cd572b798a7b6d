"""The Ray half of protoray: config, Train workers, the prototype actor, MLflow, sweeps, CLI.

``from orchestration import sweep`` is the Python entry to Tune sweeps; imported lazily so that
``orchestration.config`` stays cheap to import.
"""

from __future__ import annotations

from typing import Any

__all__ = ["resume_sweep", "sweep"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from orchestration import tuning

        return getattr(tuning, name)
    raise AttributeError(f"module 'orchestration' has no attribute {name!r}")
