"""Which models and versions are served, and which version answers a request that names none.

Each model has versions "1", "2", ... in the order they were loaded. A version is LOADING
while the replicas take it one at a time, READY once every replica has it, UNAVAILABLE once
unloaded (older than the newest `serve.keep_versions`, or its model unloaded) or when it failed
on a replica. A request without a version gets the newest version that every replica in
rotation has loaded, so a new version becomes the default only once it is fully rolled out;
one may name any version that is loaded (READY, or LOADING on the replicas that have it).
Only state lives here: `models.py` does the loading.
"""

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import grpc

from rpc_train.serve.source import ServedModel
from rpc_train.serve.spec import ModelSpec
from rpc_train.serve.statistics import ModelStatistics
from rpc_train.serve.tensors import BadRequest

READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"

Key = Tuple[str, str]  # (model, version): what a batch and a replica's module are keyed by


@dataclass
class Version:
    version: str
    served: ServedModel
    spec: ModelSpec
    digest: str  # sha256 of the model.pt bytes its replicas were sent (the response cache keys on it)
    stamp: tuple = ()  # model.pt's (mtime, size) when it was read, for serve.watch
    state: str = LOADING
    reason: str = ""
    statistics: Optional[ModelStatistics] = None  # the statistics extension's, made with the version

    @property
    def key(self) -> Key:
        return self.spec.name, self.version


@dataclass
class Model:
    name: str
    versions: Dict[str, Version] = field(default_factory=dict)  # in load order
    loaded_count: int = 0  # versions ever numbered
    unloaded: bool = False

    def newest(self) -> Optional[Version]:
        return next(reversed(self.versions.values()), None)


def spec_of(served: ServedModel, max_batch_size: int, version: str) -> ModelSpec:
    if served.generative:
        return ModelSpec.generator(served.name, served.shape[0], max_batch_size, version)
    if served.is_dlrm:
        return ModelSpec.dlrm(served.name, served.shape[0], served.table_rows, max_batch_size, version)
    return ModelSpec.classifier(served.name, served.shape, served.num_classes, max_batch_size, version)


class Repository:
    def __init__(self, keep_versions: int):
        self.keep_versions = keep_versions
        self.models: Dict[str, Model] = {}
        self._lock = threading.Lock()

    # -- what the loader changes
    def add(self, served: ServedModel, digest: str, max_batch_size: int, stamp: tuple = ()) -> Version:
        """A new version of `served.name`, LOADING."""
        with self._lock:
            model = self.models.setdefault(served.name, Model(served.name))
            model.loaded_count += 1
            model.unloaded = False
            number = str(model.loaded_count)
            version = Version(number, served, spec_of(served, max_batch_size, number), digest, stamp,
                              statistics=ModelStatistics(served.name, number))
            model.versions[number] = version
            return version

    def set_state(self, version: Version, state: str, reason: str = "") -> None:
        with self._lock:
            version.state, version.reason = state, reason

    def to_retire(self, name: str) -> List[Version]:
        """The READY versions beyond the newest `keep_versions`, now UNAVAILABLE: the loader unloads them."""
        with self._lock:
            ready = [v for v in self.models[name].versions.values() if v.state == READY]
            old = ready[:max(0, len(ready) - self.keep_versions)]
            for version in old:
                version.state = UNAVAILABLE
                version.reason = f"unloaded: serve.keep_versions={self.keep_versions} newer versions are loaded"
            return old

    def unload(self, name: str) -> List[Version]:
        """Every version of the model that was loaded, now UNAVAILABLE; later requests get NOT_FOUND."""
        with self._lock:
            model = self._model(name)
            model.unloaded = True
            gone = [v for v in model.versions.values() if v.state in (READY, LOADING)]
            for version in gone:
                version.state, version.reason = UNAVAILABLE, "unloaded (RepositoryModelUnload)"
            return gone

    # -- what requests ask
    def resolve(self, name: str, version: str, everywhere: Callable[[Key], bool],
                anywhere: Callable[[Key], bool] = lambda key: True) -> Version:
        """The version that answers (model `name`, `version`): the one named, if some replica has it
        loaded; without one, the newest READY version that `everywhere` says every replica in
        rotation has. NOT_FOUND for anything else."""
        with self._lock:
            model = self._model(name)
            if model.unloaded:
                raise BadRequest(grpc.StatusCode.NOT_FOUND, f"model '{name}' was unloaded; load it again "
                                                            "(RepositoryModelLoad) to serve it")
            servable = [v for v in model.versions.values() if v.state in (READY, LOADING)]
            if version:
                found = model.versions.get(version)
                if found is not None and found in servable and anywhere(found.key):
                    return found
                names = ", ".join(f"'{v.version}'" for v in servable if v.state == READY)
                raise BadRequest(grpc.StatusCode.NOT_FOUND, f"model '{name}' has no version '{version}' loaded; "
                                                            f"its versions are {names or 'none'} (or leave it empty)")
            for candidate in reversed(servable):
                if candidate.state == READY and everywhere(candidate.key):
                    return candidate
            raise BadRequest(grpc.StatusCode.NOT_FOUND, f"model '{name}' has no version ready yet")

    def versions(self, name: str = "") -> List[Version]:
        """Every version ever loaded of model `name` (of every model for an empty name)."""
        with self._lock:
            models = [self._model(name)] if name else list(self.models.values())
            return [v for m in models for v in m.versions.values()]

    def record_batch(self, key: Key, rows: int, seconds: float) -> None:
        """A batch of version `key` came back from its replica (the dispatcher's on_computed)."""
        with self._lock:
            model = self.models.get(key[0])
            version = model.versions.get(key[1]) if model else None
        if version is not None:
            version.statistics.batch(rows, seconds)

    def ready_versions(self, name: str) -> List[str]:
        with self._lock:
            return [v.version for v in self._model(name).versions.values() if v.state == READY]

    def index(self, ready_only: bool = False) -> List[dict]:
        """The repository index: every model's every version with its state and reason."""
        with self._lock:
            return [{"name": m.name, "version": v.version, "state": v.state, "reason": v.reason}
                    for m in self.models.values() for v in m.versions.values()
                    if not ready_only or v.state == READY]

    def _model(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            names = list(self.models)
            served = (f"the model is '{names[0]}'" if len(names) == 1
                      else "the models are " + ", ".join(f"'{n}'" for n in names))
            raise BadRequest(grpc.StatusCode.NOT_FOUND, f"model '{name}' is not served here; {served}")
        return model
