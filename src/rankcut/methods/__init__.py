"""Ways of factorizing a weight; importing this package registers them all."""

from .asvd import ASVD
from .base import Factors, MethodConfig, config_class, handler_for, method_names, register_method
from .fisher import Fisher
from .kfac import KFAC
from .svd import SVD
from .tucker import Tucker
from .whiten import Whiten

__all__ = ["ASVD", "Factors", "Fisher", "KFAC", "MethodConfig", "SVD", "Tucker", "Whiten", "config_class", "handler_for",
           "method_names", "register_method"]
