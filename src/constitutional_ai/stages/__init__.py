"""Runnable stages: the registry, the streaming runner, and one module per stage."""
