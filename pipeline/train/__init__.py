"""Training: features, model, loop, stopping rule, telemetry, training states, placement.

``loop.train`` is the entry point; ``stopping`` holds the ``GradientPlateauStopper``
decision object, ``telemetry`` the gradient statistics and their non-blocking shipping,
``state`` the crash-safe training-state checkpoints, ``schedule`` the LR schedules, and
``placement`` where Airflow runs the task. Importing this package imports nothing heavy.
"""
