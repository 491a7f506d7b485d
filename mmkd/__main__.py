"""``python -m mmkd COMMAND ...``: the same as the ``mmkd`` console script (see :mod:`mmkd.cli`)."""

import sys

from mmkd.cli import main

sys.exit(main())
