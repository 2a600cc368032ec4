"""Sweeps: YAML search section -> Ray Tune (+ Optuna) over Ray Train, with teacher reuse."""
