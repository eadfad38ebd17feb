"""rankcut: make a language model smaller and faster by low-rank factorization, and measure
honestly what it cost."""

from .calibration.sources import Calibration
from .compress.apply import CompressionReport, compress_
from .compress.pipeline import OneshotResult, oneshot
from .core.errors import RankcutError
from .core.layers import LowRankLinear
from .core.model_facts import get_tokenizer
from .core.modules import count_bytes, count_params
from .core.record import ModelRecord, record_of
from .core.targets import select_targets
from .core.version import __version__
from .io.models import load_model
from .io.saved import load, save
from .methods import ASVD, KFAC, SVD, Fisher, MethodConfig, Tucker, Whiten
from .speed.limits import speed_limits
from .train.heal import Heal, heal
from .train.softrank import SoftRank, softrank

__all__ = [
    "ASVD", "Calibration", "Fisher", "KFAC", "Whiten", "CompressionReport", "LowRankLinear", "MethodConfig", "RankcutError", "SVD", "Tucker",
    "compress_", "count_bytes", "count_params", "get_tokenizer", "load", "load_model", "save",
    "select_targets", "SoftRank", "softrank", "Heal", "heal", "speed_limits", "__version__",
    "oneshot", "OneshotResult", "ModelRecord", "record_of",
]
