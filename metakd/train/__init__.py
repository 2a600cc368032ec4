"""What trains one model: the loop skeleton (loop.py), a teacher (teacher.py), a student (student.py),
and what they need on a device: runtime.py (DDP or one process), precision.py, teacher_cache.py,
features.py (prototype features), sharded.py. Imports the method layer only (config, data, losses, models)."""
