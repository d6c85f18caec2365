"""Ray Tune: search-space files, the trial (one whole cohort per trial), the callbacks of sweeps."""
