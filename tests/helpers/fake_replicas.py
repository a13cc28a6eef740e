"""The serving dispatcher's replicas in this process: rpc.rpc_async replaced by threads that run
the real replica functions (serve/replica.py) on stages whose model is a plain function, with
torch RPC's timeout. For dispatcher tests without processes: a stage can hang, raise or answer
with the wrong shape on cue."""

import threading
import time
from types import SimpleNamespace
from typing import Callable, Dict

import torch

from rpc_train.serve import replica as replica_module

TIMEOUT_TEXT = "RPC ran for more than set timeout ({} ms) and will now be marked with an error"


class FakeReplicas:
    def __init__(self, monkeypatch, models: Dict[int, Callable[[torch.Tensor], torch.Tensor]]):
        """`models`: replica -> its one stage's function of a batch (worker name: f"worker{replica + 1}")."""
        from rpc_train.serve import dispatch

        self.calls = []  # (function name, replica, rows) of every call, in order
        self.refuse = 0  # the next this many calls raise in rpc_async itself, as a closing agent does
        for r, model in models.items():
            monkeypatch.setitem(replica_module._LOCAL, (r, 0),
                                SimpleNamespace(modules=_AnyKey(model), device=torch.device("cpu"), next_worker=None))
        monkeypatch.setattr(dispatch.rpc, "rpc_async", self.rpc_async)

    def rpc_async(self, to: str, fn, args=(), timeout: float = 0.0) -> torch.futures.Future:
        if self.refuse:
            self.refuse -= 1
            raise RuntimeError("the RPC agent is shutting down")
        if fn.__name__ == "infer_on_stage":
            rows = args[3][0]
        else:  # probe: (replica, None or ((model, version), inputs), batch ids)
            rows = args[1][1][0] if fn.__name__ == "probe" and args[1] is not None else None
        self.calls.append((fn.__name__, args[0] if args else None, None if rows is None else len(rows)))
        result, lock = torch.futures.Future(), threading.Lock()

        def settle(value=None, error=None) -> None:
            with lock:
                if result.done():
                    return
                if error is None:
                    result.set_result(value)
                else:
                    result.set_exception(error)

        def run() -> None:
            try:
                inner = fn(*args)
            except Exception as err:  # noqa: BLE001 - the remote function raised: its future carries it
                settle(error=RuntimeError(str(err)))
                return
            if not isinstance(inner, torch._C.Future):  # .then() gives the C type
                settle(inner)
                return

            def chained(f) -> None:
                try:
                    settle(f.wait())
                except Exception as err:  # noqa: BLE001
                    settle(error=RuntimeError(str(err)))

            inner.add_done_callback(chained)

        threading.Thread(target=run, daemon=True).start()
        if timeout:
            threading.Timer(timeout, settle, kwargs={"error": RuntimeError(TIMEOUT_TEXT.format(int(1e3 * timeout)))}
                            ).start()
        return result


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class _AnyKey(dict):
    """A stage's modules by (model, version): the one fake model, whichever version is asked."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __getitem__(self, key):
        return self.model
