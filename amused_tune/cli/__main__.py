"""`python -m amused_tune.cli ...` (used by `accelerate launch -m` and `torchrun -m`) is `amused-tune ...`."""

import sys

from amused_tune.cli import main

sys.exit(main())
