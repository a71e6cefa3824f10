"""`python -m sdcompress.cli`, the same as `python -m sdcompress`."""

import sys

from . import main

sys.exit(main())
