"""``python -m selfgrow`` = the ``selfgrow`` command."""

import sys

from .cli import main

sys.exit(main())
