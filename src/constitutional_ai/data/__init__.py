"""Prompt sources, the resumable record store and dataset exports."""
