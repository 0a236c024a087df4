"""grouplora: one language model for many datasets, through grouped LoRA adapters."""

import logging
import os
import warnings

__version__ = "0.1.0"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Idle OpenMP threads sleep instead of spinning: on a small shared CPU, spinning threads starve the busy ones
# (measured 5-100x slowdowns of the batched estimator with two spinning threads). Must precede torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# bitsandbytes looks for an optional 4-bit CPU kernel on a model hub at import and warns when it cannot reach
# one; its built-in CPU path is what we use, so the warning is noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft calls a transformers method that transformers 5 deprecates, on every adapter load/save.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
