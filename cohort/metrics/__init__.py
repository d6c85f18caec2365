"""Accuracy and calibration metrics (pure), temperature scaling, reliability bins."""
