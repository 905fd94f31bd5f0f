"""``python -m server`` runs the ``apportion`` command line."""

import sys

from server.cli import main

sys.exit(main())
