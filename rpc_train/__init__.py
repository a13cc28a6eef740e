"""rpc_train: model-parallel and parameter-server training over torch.distributed.rpc.

Importing the package is cheap on purpose (no torch import): the launcher's preflight check
imports the config schema from here before torchrun starts any process.
"""

__version__ = "0.1.0"
