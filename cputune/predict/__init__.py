"""Predictions: the predictor, hardware profiles, box resolution, calibration, the published-runs fit, quant selection."""
