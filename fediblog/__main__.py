"""``python -m fediblog``: the same as the ``fediblog`` command."""

import sys

from fediblog.cli import main

sys.exit(main())
