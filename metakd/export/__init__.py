"""Take a trained model away: ``metakd export`` and ``metakd predict``.

- ``select.py``: which student of a sweep (``--trial`` / ``--best``, then the seed), from the results table;
- ``artifacts.py``: a student's or teacher's directory on the store, refused when it has no weights;
- ``hf.py``: a metakd model as a standard Hugging Face directory (or an ONNX graph where no standard class
  computes its head), with the tokenizer of its data;
- ``card.py``: the model card (README.md) of an exported directory;
- ``predict.py``: labels and probabilities of an exported directory or a kept student;
- ``cli.py``: the two subcommands.

Reads what the lower layers wrote: may import ``metakd.models``, ``storage``, ``data``, ``loader``,
``methods``, ``config``, ``report`` and the layouts of ``jobs.cache`` (where a sweep's artifacts are)
and ``train.teacher_cache`` (which data a teacher's outputs are of); nothing below imports it.
"""
