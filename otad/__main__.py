import sys

from otad.cli import main

__layer__ = "cli"

sys.exit(main())
