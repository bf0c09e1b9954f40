"""``python -m mllm_mod.train`` (and ``deepspeed --module`` / ``torchrun -m`` / ``accelerate launch -m``)."""

import sys

from .cli import main

sys.exit(main())
