"""``python -m rdtf ...``: the CLI where the ``rdtf`` script is not installed (a bare GPU box)."""

import sys

from rdtf.cli import main

sys.exit(main())
