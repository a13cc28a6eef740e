"""Fault drills for the parameter-server and hybrid trainers, installed through `ps.step_hook`
or `hybrid.step_hook`.

    ps.step_hook={_target_:helpers.faults.FailAt,trainer:1,step:7}              # raise there
    ps.step_hook={_target_:helpers.faults.FailAt,trainer:1,step:7,stall:true}   # hang there
    hybrid.step_hook={_target_:helpers.faults.NanGradientAt,trainer:1,step:3}   # NaN gradients there

The ranks import this module, so the launch puts tests/ on PYTHONPATH (helpers.launching).
"""

import threading


class FailAt:
    def __init__(self, trainer: int, step: int, stall: bool = False):
        self.trainer, self.step, self.stall = trainer, step, stall

    def __call__(self, trainer_id: int, step: int) -> None:
        if (trainer_id, step) != (self.trainer, self.step):
            return
        if self.stall:
            threading.Event().wait()  # forever, as a hung process would: only the driver ends this
        raise RuntimeError(f"injected fault at step {step}")


class NanGradientAt:
    """Trainer `trainer`'s backward at `step` carries NaN gradients into every parameter (the
    loss of that step is finite; the next step's, on the updated parameters, is not): a numeric
    blow-up that starts in a gradient, as the non-finite-loss errors must trace."""

    def __init__(self, trainer: int, step: int):
        self.trainer, self.step = trainer, step

    def __call__(self, trainer_id: int, step: int) -> None:
        if (trainer_id, step) != (self.trainer, self.step):
            return
        import torch
        from torch.nn.parallel import DistributedDataParallel

        def poison(module, inputs, output):
            # The outermost model's output: its gradient flows into every parameter and looked-up row.
            if isinstance(module, DistributedDataParallel) and output.requires_grad:
                handle.remove()
                output.register_hook(lambda grad: torch.full_like(grad, float("nan")))

        handle = torch.nn.modules.module.register_module_forward_hook(poison)
