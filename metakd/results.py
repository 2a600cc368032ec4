"""``metakd.results.load(path)``: the public way to load a sweep's result table (a pandas DataFrame),
as users' scripts and notebooks call it. The schema, writer and reader live in
:mod:`metakd.report.results`; this module only names them where users look."""

from .report.results import load, load_curves  # noqa: F401
