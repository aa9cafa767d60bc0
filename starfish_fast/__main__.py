"""``python -m starfish_fast``: the ``starfish-fast`` command line."""
import sys

from starfish_fast.cli import main

sys.exit(main())
