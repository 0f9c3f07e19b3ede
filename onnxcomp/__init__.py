"""onnxcomp: optimize ONNX models for ONNX Runtime and measure what it cost.

    import onnxcomp
    model, report = onnxcomp.optimize("model.onnx", "fuse-bn,cleanup", data="test.npz", output="model.opt.onnx")
    print(report.render())
"""

from onnxcomp.api import check_budgets, load, optimize, save
from onnxcomp.distillation import DistillConfig, distill, heal
from onnxcomp.errors import BudgetExceeded, InputError, OnnxcompError
from onnxcomp.manager import PassManager
from onnxcomp.pass_base import Pass, PassContext, PassResult, PostconditionError, PreconditionError
from onnxcomp.validate import validate

__all__ = [
    "BudgetExceeded", "DistillConfig", "InputError", "OnnxcompError", "Pass", "PassContext", "PassManager", "PassResult",
    "PostconditionError", "PreconditionError", "check_budgets", "distill", "heal", "load", "optimize", "save",
    "validate",
]
__version__ = "0.1.0"
