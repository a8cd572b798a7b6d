"""The Ray half of protoray: config, Train workers, the prototype actor, MLflow, sweeps, CLI.

Python entry points: ``orchestration.run.train`` (one run) and ``orchestration.sweep.run_sweep``
(a Ray Tune sweep); ``orchestration.cli`` is the ``protoray`` command.
"""
