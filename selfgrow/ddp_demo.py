"""DDP growth demo: ``torchrun --standalone --nproc_per_node=2 -m selfgrow.ddp_demo``.

A separate module (not imported by the package) so that ``-m`` runs it without Python's
"found in sys.modules" warning; the demo itself lives in :mod:`selfgrow.control.distributed`.
"""

from __future__ import annotations

from .control.distributed import _demo

if __name__ == "__main__":
    _demo()
