"""rankcut: make a language model smaller and faster by low-rank factorization, and measure
honestly what it cost."""

__version__ = "0.1.0"

from .compress import CompressionReport, compress_, count_bytes, count_params  # noqa: E402
from .errors import RankcutError  # noqa: E402
from .io import load, save  # noqa: E402
from .layers import LowRankLinear  # noqa: E402
from .calibration import Calibration  # noqa: E402
from .methods import ASVD, SVD, Fisher, MethodConfig, Tucker, Whiten  # noqa: E402
from .models import get_tokenizer, load_model  # noqa: E402
from .targets import select_targets  # noqa: E402
from .softrank import SoftRank, softrank  # noqa: E402
from .heal import Heal, heal  # noqa: E402
from .speedlimits import speed_limits  # noqa: E402

__all__ = [
    "ASVD", "Calibration", "Fisher", "Whiten", "CompressionReport", "LowRankLinear", "MethodConfig", "RankcutError", "SVD", "Tucker",
    "compress_", "count_bytes", "count_params", "get_tokenizer", "load", "load_model", "save",
    "select_targets", "SoftRank", "softrank", "Heal", "heal", "speed_limits", "__version__",
]
