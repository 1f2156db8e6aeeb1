"""dwnet-ds: DWNet / dynamic DWNet models and their DeepSpeed training system."""
from . import models  # noqa: F401  (registers the models with timm)

__version__ = "0.1.0"
