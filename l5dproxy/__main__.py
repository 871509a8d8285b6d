"""``python -m l5dproxy``: the ``l5dproxy`` command (l5dproxy.app.command)."""

import sys

from l5dproxy.app.command import main

sys.exit(main())
