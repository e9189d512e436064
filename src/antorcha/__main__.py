"""`python -m antorcha` is the `antorcha` command."""

import sys

from antorcha.cli import main

sys.exit(main())
