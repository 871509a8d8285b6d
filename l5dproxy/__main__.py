"""``python -m l5dproxy``: the ``l5dproxy`` command (l5dproxy.command)."""

import sys

from l5dproxy.command import main

sys.exit(main())
