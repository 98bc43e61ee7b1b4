"""``python -m hub.ctl`` is ``outpost``."""

import sys

from hub.ctl import main

sys.exit(main())
