"""``python -m ldmkit`` (also what ``accelerate launch -m ldmkit train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
