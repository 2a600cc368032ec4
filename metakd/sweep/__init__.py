"""The search: a sweep YAML's search section -> a Ray Tune run (space.py), the per-trial driver and the
Tuner (tuner.py), and the console (progress.py). Imports jobs/ and report/; nothing imports it but cli."""
