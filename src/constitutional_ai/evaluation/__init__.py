"""Evaluation: calibration and accuracy metrics shared by the labeler and preference-model evaluations."""
