"""Plain PyTorch models that know nothing of RPC.

Every model but the DLRM is an `nn.Sequential`: its children are the units `rpc_train` may
place on different workers, so a model is split by slicing that sequence. The DLRM
(`dlrm.py`) is split by mode=hybrid into its tables and its dense part instead. Adding a
model is one file here and one YAML in `conf/model/` naming it with `_target_`.
"""
