"""What reads and writes result tables: the Parquet schema (results.py), rows from student summaries
(rows.py), the paper's tables and paired statistics (analysis.py), plots.py, the cost of a sweep from its
event files (cost.py, which reads them with jobs.events) and the report CLI (cli.py). Otherwise imports
only config and the standard data stack; the jobs, sweep and CLI layers write through it."""
