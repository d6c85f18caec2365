"""The driver of a cohort run: the plan, Ray started or joined, placement and threads, the trainer, the run from start to its logged result."""
