"""simfx: add Self Identity Mapping (SIM) to any traceable PyTorch model with one call.

>>> import torch, torchvision, simfx
>>> model = torchvision.models.resnet18(num_classes=10)
>>> sim = simfx.transform(model, example_inputs=torch.randn(2, 3, 64, 64))
>>> out, sim_loss = sim(torch.randn(4, 3, 64, 64))     # training: (output, sim_loss)
>>> plain = simfx.strip(sim)                             # same parameters, plain forward
>>> report = simfx.explain(sim)                          # print(report): blocks, sizes, FLOPs
"""

from . import metrics
from .runtime import monitor  # simfx.monitor.flush(): the deferred non-finite loss checks
from .api import BoundaryRow, BoundaryTable, find_boundaries, transform
from .analysis.boundaries import Boundary
from .inspect.draw import draw
from .errors import (
    ExampleInputsError, FaithfulnessError, InputShapeError, NoEligibleBlockError, SelectorError, SimfxError,
    TraceError, UnsupportedModelError,
)
from .inspect.explain import Report, explain
from .runtime.monitor import NonFiniteLossWarning
from .runtime.module import SimGraphModule
from .inspect.graphs import GraphDiff, graph_diff, to_networkx
from .runtime.objectives import OBJECTIVES, objective_names, register_objective
from .options import SimOptions
from .runtime.module import original_state_dict, strip
from .plan.select import Plan, PlannedBlock
from .capture.registry import AUTOWRAP_FUNCTIONS, LEAF_MODULES, register_autowrap_function, register_leaf_module
from . import integrations  # noqa: F401  (library registrations, e.g. timm's notrace marks)
from . import compat  # simfx.compat: the SIM-pytorch decorator API; no dependency beyond the modules above

__version__ = "0.1.0"

__all__ = [
    "transform",
    "find_boundaries",
    "strip",
    "original_state_dict",
    "explain",
    "Report",
    "to_networkx",
    "graph_diff",
    "GraphDiff",
    "draw",
    "register_leaf_module",
    "register_autowrap_function",
    "register_objective",
    "LEAF_MODULES",
    "AUTOWRAP_FUNCTIONS",
    "OBJECTIVES",
    "objective_names",
    "metrics",
    "SimOptions",
    "Boundary",
    "BoundaryRow",
    "BoundaryTable",
    "Plan",
    "PlannedBlock",
    "SimGraphModule",
    "SimfxError",
    "TraceError",
    "NoEligibleBlockError",
    "SelectorError",
    "ExampleInputsError",
    "FaithfulnessError",
    "InputShapeError",
    "UnsupportedModelError",
    "NonFiniteLossWarning",
]
