"""``python -m worker ARGS``: the same as ``apportion worker ARGS``."""

import sys

from worker.agent import main

sys.exit(main())
