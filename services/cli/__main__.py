"""`python -m services.cli`: the `moe` command."""

import sys

from services.cli import main

sys.exit(main())
