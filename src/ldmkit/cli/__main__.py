"""``python -m ldmkit.cli`` (the same as ``python -m ldmkit``)."""

import sys

from . import main

sys.exit(main())
