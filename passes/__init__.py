"""The passes of onnxcomp, one module each. Importing this package registers them all."""

import importlib
import pkgutil

# Every module of the package is imported, so a new pass registers itself by existing; helper modules
# (layers, kmeans, calibrate, ...) register nothing.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
