"""Studies over seeds: the study file, its experiment on Ray Tune, its results from MLflow, the paired
statistics, tables and figures."""
