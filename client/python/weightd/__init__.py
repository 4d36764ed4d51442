"""weightd: attach to LLM weights kept resident by the weightd daemon, zero-copy.

    import weightd
    w = weightd.attach("llama3-8b", rank=2)   # dict name -> torch.Tensor (numpy without torch)
    c = weightd.Client()                       # list/status/load/unload/metrics/attach
    c.load("demo", "/models/demo", tp=2, wait=True)
    c.update("llama3-8b", {"lm_head.weight": t})   # new weights: the next generation
    w.refresh()                                # w's tensors show them now, at the same addresses

ctypes over libweightd_client.so (the C ABI, client/include/weightd/c_api.h), found through
$WEIGHTD_CLIENT_LIB, next to this package, or on the system library path. Errors raise
WeightdError subclasses carrying the status code and the daemon's message.
"""
from ._client import Attachment, Client, attach
from ._errors import (AlreadyExistsError, CancelledError, DataLossError, DeadlineExceededError,
                      FailedPreconditionError, InternalError, InvalidArgumentError, NotFoundError,
                      OutOfRangeError, PermissionDeniedError, ResourceExhaustedError,
                      UnavailableError, UnimplementedError, WeightdError)

__version__ = "0.1.0"

__all__ = [
    "Attachment", "Client", "attach", "WeightdError", "AlreadyExistsError", "CancelledError",
    "DataLossError", "DeadlineExceededError",
    "FailedPreconditionError", "InternalError", "InvalidArgumentError", "NotFoundError",
    "OutOfRangeError", "PermissionDeniedError", "ResourceExhaustedError", "UnavailableError",
    "UnimplementedError",
]
