"""Training loops: one loop skeleton (loop.py), teachers (teacher.py), students (student.py),
and the experiment that strings them together (experiment.py)."""
