"""Prefect 3 flows over the ``mme`` library: ``mme-pipeline`` and ``reevaluate`` (+ ``serve``).

The flows only call tasks (:mod:`flows.tasks`); the tasks are thin typed wrappers of the stage
functions in :mod:`mme`, which knows nothing about Prefect.
"""
