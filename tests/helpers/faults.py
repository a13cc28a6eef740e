"""Fault drills for the parameter-server and hybrid trainers, installed through `ps.step_hook`
or `hybrid.step_hook`.

    ps.step_hook={_target_:helpers.faults.FailAt,trainer:1,step:7}              # raise there
    ps.step_hook={_target_:helpers.faults.FailAt,trainer:1,step:7,stall:true}   # hang there

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
