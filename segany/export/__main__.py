"""`python -m segany.export CHECKPOINT OUT [--format ...]`: see segany.export."""

import sys

from segany.export import main

sys.exit(main())
