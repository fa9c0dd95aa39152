"""Allow ``python -m forgelab``."""

import sys

from forgelab.cli import main

sys.exit(main())
