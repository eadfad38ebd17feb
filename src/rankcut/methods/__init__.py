"""Ways of factorizing a weight; importing this package registers them all."""

from .base import Factors, MethodConfig, config_class, handler_for, method_names, register_method
from .svd import SVD
from .tucker import Tucker

__all__ = ["Factors", "MethodConfig", "SVD", "Tucker", "config_class", "handler_for",
           "method_names", "register_method"]
