"""The search: a sweep YAML's search section -> a Ray Tune run (space.py), the per-trial driver and the
Tuner (tuner.py), the console (progress.py), the persistent Optuna study (study.py) and ``metakd plan``
(plan.py). Imports jobs/ and report/; nothing imports it but cli."""
