"""``python -m pdserve`` runs the command line."""

import sys

from pdserve.cli import main

sys.exit(main())
