"""`python -m flexiact_backend ...` is the `flexiact-backend` command."""

import sys

from .tools.cli import main

sys.exit(main())
