"""``python -m mllm_mod.train`` (and ``deepspeed -m`` / ``torchrun -m`` / ``accelerate launch -m``)."""

import sys

from .cli import main

sys.exit(main())
