"""The passes of onnxcomp, one module each. Importing this package registers them all."""

from . import cleanup, equalize, fuse_bn, heal, prune, quantize, share, short_names  # noqa: F401
