"""napari-registration: align images in napari and from Python.

The public API is importable without napari, Qt, OpenCV or SimpleITK.
"""

__version__ = "0.1.0"

from .core.register import (  # noqa: E402
    BackendResult,
    RegistrationCancelled,
    RegistrationError,
    RegistrationResult,
    apply_transform,
    available_methods,
    method_info,
    register,
)
from .core.transform import Transform, load_transform, save_transform  # noqa: E402
from .core.stack import StackResult, register_stack  # noqa: E402
from .core.series import (  # noqa: E402
    TransformSeries,
    apply_stack_transforms,
    load_transforms,
    save_transforms,
)

__all__ = [
    "register",
    "register_stack", "StackResult",
    "save_transforms", "load_transforms", "apply_stack_transforms", "TransformSeries",
    "apply_transform",
    "RegistrationResult",
    "BackendResult",
    "RegistrationError",
    "RegistrationCancelled",
    "Transform",
    "save_transform",
    "load_transform",
    "available_methods",
    "method_info",
    "__version__",
]
