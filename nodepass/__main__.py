"""``python -m nodepass URL``: the same program as the ``nodepass`` command."""

import sys

from nodepass.cli import main

sys.exit(main())
