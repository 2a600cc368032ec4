"""Who trains what, where and when: a configuration -> teacher and student jobs (experiment.py), the
registry of claims, the trial's schedule, the per-worker functions, the Ray and local runners, events,
the artifact cache every sweep on a storage shares and the claims on it across sweeps (cache.py,
claims.py), and ``metakd run`` (run.py). Imports train/, data, storage and report/ (to write rows); never sweep/."""
