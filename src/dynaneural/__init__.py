"""DynaNeural: dynamic neural networks that really skip work.

One model definition runs in three modes (train, simulate, execute), keeps a per-sample cost ledger and can be
calibrated to a compute budget. See README.md.
"""

from dynaneural import sample_wise, spatial_wise, temporal_wise  # noqa: F401  (every method module registers)
from dynaneural.execution import Mode
from dynaneural.outputs import DynamicOutput, EarlyExitOutput
from dynaneural.registry import create_model, list_models, register_model
from dynaneural.version import __version__

__all__ = ["Mode", "DynamicOutput", "EarlyExitOutput", "create_model", "list_models", "register_model",
           "__version__"]
