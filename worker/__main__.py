"""``python -m worker`` is the same as the ``embedding-worker`` command."""

import sys

from worker.cli import main

sys.exit(main())
