"""Ray Tune sweeps over MedSAM2 variants (the only package that imports ray).

* ``tuning.spaces``: ``SPACES`` registry of search spaces (``smoke``, ``adapters_x_decoders``, ``gpu_h100``)
  and their default per-trial resources ``SPACE_RESOURCES``.
* ``tuning.trainable``: the Tune trial (``run_trial``) with the ``TuneReport`` callback and its MLflow child
  run (``trial_run``).
* ``tuning.sweep``: ``run_sweep(space, num_samples, base_cfg=...) -> SweepResult`` and the CLI hook
  ``cli_sweep(space, num_samples, address, config, overrides, json) -> dict``.
* ``tuning.report``: the results table and the parallel-coordinates plot logged to the sweep's parent run.
"""
