"""The Ray half of protoray: config, Train workers, the prototype actor, MLflow, sweeps, CLI.

One module per Ray role, kept flat: ``run`` (the driver of one run), ``worker`` with ``shards``
and ``streaming`` (what a Train worker iterates), ``prototypes`` (the E-step actor), ``sweep``
(Ray Tune), ``tracking`` and ``export`` (MLflow), ``config`` and ``cli`` (what users type).

Python entry points: ``orchestration.run.train`` (one run) and ``orchestration.sweep.run_sweep``
(a Ray Tune sweep); ``orchestration.cli`` is the ``protoray`` command.
"""
