"""``python -m csc_serve.cli`` (and ``torchrun -m csc_serve.cli``) runs the ``csc`` command line."""

import sys

from csc_serve.cli.main import main

sys.exit(main())
