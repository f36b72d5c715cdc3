"""Shared by every stage: config, errors, models, data, calibration, evaluation, file I/O, progress bars."""
