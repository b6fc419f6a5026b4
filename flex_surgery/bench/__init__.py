"""Research runners: ``python -m flex_surgery.bench <runner> ...``, one CSV per run.

``export`` (:mod:`flex_surgery.bench.export`) measures exporting a model with ``torch.export``
(static and dynamic shapes), running the program, and writing new weights into it with
:func:`~flex_surgery.export.inject_weights` against a raw copy and a re-export. Named models come
from ``configs/models.json`` (:mod:`flex_surgery.bench.models`).
"""
