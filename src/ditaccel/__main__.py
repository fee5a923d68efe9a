"""``python -m ditaccel ...`` (and ``accelerate launch -m ditaccel ...``): the command line."""

import sys

from .cli.main import main

sys.exit(main())
