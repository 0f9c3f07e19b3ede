"""The passes of onnxcomp, one module each. Importing this package registers them all."""

from . import (  # noqa: F401
    cleanup, equalize, flush_denormals, fold_constants, fuse_bn, heal, prune, quantize, share, short_names,
)
