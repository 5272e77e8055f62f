"""Training: features, model, loop, stopping rule, telemetry, training states.

``loop.train`` is the entry point; ``stopping`` holds the ``GradientPlateauStopper``
decision object, ``telemetry`` the gradient statistics and their non-blocking shipping,
``state`` the crash-safe training-state checkpoints and ``schedule`` the LR schedules.
Where Airflow runs the task is ``dags/placement.py``. Importing this package imports
nothing heavy.
"""
