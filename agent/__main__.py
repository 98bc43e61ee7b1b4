"""``python -m agent`` is ``outpost-agent``."""

import sys

from agent.cli import main

sys.exit(main())
