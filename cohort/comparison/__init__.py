"""The library behind ``python -m cohort.compare`` (the command is ``cohort.compare``).

* ``runs``: what the comparison knows of a run (``CohortRun``): peers, edges, methods, gaps.
* ``queries``: MLflow reads: which runs, their final metrics, their logged topology.
* ``table``: the table's columns, rows, sorting and rendering.
* ``figures``: the figures, and logging them into the runs.
"""
