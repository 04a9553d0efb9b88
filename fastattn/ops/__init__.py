"""The op layer: one module per op family (torch.library registration, fakes, autograd, backend
choice, public functions). Importing this package registers every op."""

from fastattn.ops import attention  # noqa: F401
from fastattn.ops._backend import BACKENDS, backends  # noqa: F401
