"""Growth inside the trainers people already use.

* :mod:`selfgrow.integrations.hf`: ``GrowthCallback`` for ``transformers.Trainer``
  (``pip install 'selfgrow[hf]'``).

Each submodule imports its trainer library when it is imported; this package imports none.
"""
