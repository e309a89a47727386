"""``python -m twotower.launch ...`` = ``twotower-launch ...`` (see ``twotower.launch.cli``)."""

import sys

from twotower.launch.cli import main

sys.exit(main())
