"""A study's runs as MLflow holds them: the parent run (found by the study's name), its children
(one per arm and seed) as ``Outcome``s, and their reliability bins pooled over seeds."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cohort.studies.experiment import ARM_TAG, SEED_TAG, STUDY_TAG
from cohort.studies.tables import Outcome


def find_parent(client, experiment: str, name: str):
    """The study's parent run (the latest, should a name have been reused), or None."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], f"tags.`{STUDY_TAG}` = '{name}' and tags.`cohort.study.parent` = 'true'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def outcomes(client, parent) -> list[Outcome]:
    """Every child run of the study: arm, seed, status, final metrics (the latest value of each key)."""
    from cohort.comparison.queries import all_pages

    runs = all_pages(lambda page_token=None: client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", page_token=page_token))
    found = []
    for run in runs:
        tags = run.data.tags
        if ARM_TAG not in tags or SEED_TAG not in tags:
            continue
        found.append(Outcome(tags[ARM_TAG], int(tags[SEED_TAG]), run.info.status, dict(run.data.metrics),
                             run.info.run_id, tags.get("cohort.error", "")))
    return sorted(found, key=lambda outcome: (outcome.seed, outcome.arm))


def pooled_bins(client, outcomes_of_arm: list[Outcome], peer: str):
    """The reliability bins of ``peer`` summed over the arm's finished runs (None when none logged
    them): per bin the counts add up, accuracy and confidence are count-weighted means."""

    from cohort.metrics.reliability import ReliabilityBins, bins_file_name

    parts = []
    with tempfile.TemporaryDirectory(prefix="cohort-study-") as scratch:
        for outcome in outcomes_of_arm:
            if outcome.status != "FINISHED":
                continue
            name = bins_file_name(peer)
            if name not in {Path(item.path).name for item in client.list_artifacts(outcome.run_id, "reliability")}:
                continue
            local = Path(client.download_artifacts(outcome.run_id, f"reliability/{name}", scratch))
            parts.append(ReliabilityBins.from_dict(json.loads(local.read_text())))
    return ReliabilityBins.merge(parts) if parts else None
