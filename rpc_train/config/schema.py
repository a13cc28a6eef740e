"""Structured config schemas, registered in Hydra's ConfigStore.

Typed dataclasses make a typo (`pipeline.micro_batch=4`) or a wrong type
(`trainer.epochs=two`) fail when the config is composed, on every rank alike, before any
process starts RPC. `model` and `optim` stay free-form: they are `_target_` dicts for
`hydra.utils.instantiate`, and their keys belong to the class they name.
"""

import sysconfig
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


# The values some settings take; validate.py checks them, the code that uses them imports them.
MODES = ("pipeline", "parameter_server", "serve", "hybrid", "predict")
ROUTINGS = ("least_loaded", "round_robin", "power_of_two")
DEVICES = ("cpu", "cuda")
BALANCE_STRATEGIES = ("params", "time")
SCHEDULES = ("gpipe", "1f1b")
# runtime.allocator values: runtime/allocator.py has their libraries.
ALLOCATORS = ("glibc", "jemalloc", "tcmalloc")
# trainer.loss values: training/loss.py LOSSES has their functions.
LOSS_NAMES = ("cross_entropy",)
BALANCE_HELP = "'params', 'time', or a list of layer counts per stage such as [3,2]"
SHARDINGS = ("table", "row")
LOADERS = ("local", "service")
ON_SAMPLE_ERROR = ("raise", "skip")
EMBEDDING_OPTIMS = ("sgd", "rowwise_adagrad")
# Optimizers (torch.optim class names) whose update, given their state, is the learning rate
# times a term that depends on neither, and whose state does not depend on it: scaling one
# step's learning rate by f moves the parameters exactly f as far, which ps.staleness_lr relies
# on (training/staleness.py). Not Rprop (it adapts its own step sizes after the first) nor ASGD
# (it folds the learning rate into its state). Both EMBEDDING_OPTIMS qualify.
STEP_FOLLOWS_LR = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta")


def num_stages(pipeline, world_size: int) -> int:
    """`pipeline.stages`, or every worker when it is null (rank 0 drives, the rest host stages).
    `world_size`: the mode's world, without the data workers (`mode_world_size`)."""
    return pipeline.stages or world_size - 1


def data_workers(cfg) -> int:
    """Ranks 1..data_workers(cfg) are data workers (loader=service); 0 with loader=local."""
    return cfg.loader.workers if cfg.loader.name == "service" else 0


def mode_world_size(cfg, world_size: int) -> int:
    """The world the mode lays its roles out in: the driver and every rank after the data
    workers (runtime/roles.py `role_rank` maps its ranks back)."""
    return world_size - data_workers(cfg)


def as_dict(node):
    """A config group as a plain dict, e.g. to send over RPC (None and dicts pass through)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


@dataclass
class RuntimeConf:
    # Seconds before an RPC (and so a stuck or dead worker) fails the job.
    rpc_timeout_s: float = 60.0
    # TensorPipe's RPC thread pool per process; each in-flight micro-batch holds one thread.
    num_worker_threads: int = 16
    # torch intra-op threads per process; 0 shares the machine's cores among the local ranks.
    threads: int = 0
    # Network interface TensorPipe and gloo listen on (multi-node); null: loopback for one machine.
    interface: Optional[str] = None
    # Let runtime.interface have a public address (neither loopback nor a private range). RPC runs
    # whatever pickle reaches its port: only behind a firewall that admits the job's machines alone.
    allow_public_interface: bool = False
    # TensorPipe transports. "uv" (TCP) by default: the shared-memory "shm" transport busy-polls,
    # which costs an idle process a share of a core (docs/benchmarks.md) and sped no step up.
    transports: List[str] = field(default_factory=lambda: ["uv"])
    # Keep freed tensor memory for reuse rather than return it to the OS and fault it back in
    # on the next micro-batch (glibc only; see rpc_train/runtime/allocator.py). Costs the peak heap.
    # Benchmarks apply it to every process they time, baselines and peers too.
    hold_freed_memory: bool = True
    # malloc of every rank: "glibc" (with hold_freed_memory's thresholds, which stop at 32 MB), or
    # "jemalloc"/"tcmalloc", caching allocators that keep larger tensors too (ResNet-50 at 224 px),
    # preloaded by launch.sh from Debian's libjemalloc2/libtcmalloc-minimal4 (docs/pipeline.md).
    allocator: str = "glibc"


@dataclass
class PipelineConf:
    # Number of model stages; null uses every worker (world_size - 1).
    stages: Optional[int] = None
    # Each batch is split into this many micro-batches that flow through the stages.
    micro_batches: int = 4
    # How layers are assigned to stages: "time" (measured forward+backward per layer), "params",
    # or a list of layer counts. Parameter counts mislead for conv nets: the first conv blocks
    # have the fewest parameters and the most compute.
    balance: Any = "time"
    # "gpipe": every micro-batch enters at once; "1f1b": stage k of K holds at most K-k
    # micro-batches (forward done, backward not), which bounds activation memory
    # (stage<k>/peak_memory_mb). Both run each backward as soon as it can.
    schedule: str = "1f1b"
    # Log a timeline figure of the pipeline every N steps (0: never).
    timeline_every: int = 100
    # Write a Chrome trace (trace.json in the run dir, opens in Perfetto) of this step.
    trace_step: Optional[int] = None
    # Record this step with torch.profiler on every rank: profile/step_N/<rank>.json in the
    # run dir, and merged.json with every rank on one clock (pipeline/profile.py).
    profile_step: Optional[int] = None


@dataclass
class PSConf:
    """mode=parameter_server: rank 0 drives, ranks 1..servers hold parameter shards, the rest train."""

    # Ranks that hold a shard of the parameters (and its optimizer); the ranks after them train.
    servers: int = 1
    # true: each step the servers wait for every trainer's gradient, average, and step once
    # (equivalent to one process with batch trainers x trainer.batch_size); false: each
    # gradient is applied as soon as it arrives.
    sync: bool = True
    # Async only: a gradient computed on parameters more than this many updates behind the
    # server is refused; the trainer refreshes its copy and recomputes before pushing again.
    max_staleness: int = 4
    # Async only: lower the servers' SGD momentum by the momentum asynchrony adds by itself,
    # about 1 - 1/trainers (Mitliagkas et al. 2016), so that their sum stays optim.momentum.
    momentum_compensation: bool = True
    # Async only: a gradient computed `s` updates ago takes 1/s of a step (Zhang et al. 2016).
    staleness_lr: bool = False
    # Clip each gradient a server applies (its shard's part) to this L2 norm; null: no clipping.
    clip_grad_norm: Optional[float] = None
    # A `_target_` config of a callable that every trainer builds and calls as
    # hook(trainer_id, step) before each of its steps (step counts from 1): for profiling,
    # custom logging, or fault drills (the tests make a trainer raise or hang this way).
    step_hook: Any = None


@dataclass
class HybridConf:
    """mode=hybrid: rank 0 drives, ranks 1..servers hold embedding shards, the rest train under DDP."""

    # Ranks that hold embedding shards (and their optimizers); the ranks after them train.
    servers: int = 1
    # "table": whole tables on servers, balanced by rows x dim, largest first; "row": every
    # table split into contiguous row ranges, one per server.
    sharding: str = "table"
    # true: a step's embedding gradients from every trainer are averaged before a server applies
    # them (N trainers at batch b compute what one process at batch N x b does); false: each
    # trainer's gradient is applied as it arrives (its staleness is at most 2 x (trainers - 1):
    # the dense part's all-reduce keeps the trainers within a step of each other).
    sync: bool = True
    # The tables' optimizer, one per shard on its server: "sgd" or "rowwise_adagrad" (one
    # accumulator a row, as DLRM and TorchRec use); either updates only the rows a step touched.
    embedding_optim: str = "sgd"
    embedding_lr: float = 0.1
    # Async only: a gradient computed `s` updates ago takes 1/s of a step (training/staleness.py).
    staleness_lr: bool = False
    # Clip each gradient a server applies (its shard's part) to this L2 norm; null: no clipping.
    clip_grad_norm: Optional[float] = None
    # As ps.step_hook: a `_target_` callable each trainer calls as hook(trainer_id, step) before each step.
    step_hook: Any = None


@dataclass
class TLSConf:
    # PEM files: the server's certificate and key turn TLS on; a client CA makes it mutual (every
    # client must present a certificate that CA signed).
    cert: Optional[str] = None
    key: Optional[str] = None
    client_ca: Optional[str] = None


@dataclass
class ServeConf:
    """mode=serve: rank 0 is the front end (the Open Inference Protocol over gRPC and HTTP), the rest
    host replicas."""

    # The run directory whose model.pt to serve; null: the newest run under outputs/ that has one.
    run: Optional[str] = None
    # The front end listens here; loopback unless told otherwise.
    host: str = "127.0.0.1"
    port: int = 8001
    # The same protocol over HTTP/REST (KServe v2 / Triton's JSON, with the binary tensor data
    # extension) on serve.host:http_port, behind the same TLS and token; 0: no HTTP.
    http_port: int = 8000
    # The model's name in the protocol; null: the served run's model option (mlp, convnet, ...).
    model_name: Optional[str] = None
    # Several models, name -> run dir: +serve.models.a=outputs/A +serve.models.b=outputs/B;
    # empty: the one model above (serve.run, named serve.model_name). RepositoryModelLoad adds
    # versions (and models) while serving.
    models: Dict[str, str] = field(default_factory=dict)
    # Versions kept loaded per model (the newest ones); older ones are unloaded once no batch uses them.
    keep_versions: int = 2
    # Load a newer model.pt of each served run as training writes it (polled every second).
    watch: bool = False
    # Stages per replica: (workers) / stages replicas, each a pipeline of this many stages.
    stages: int = 1
    # Dynamic batching: at most this many rows a batch (a request counts its rows) ...
    max_batch_size: int = 32
    # ... and at most this many batches in flight per replica.
    max_inflight_batches: int = 2
    # 0: a batch leaves as soon as a replica has room; > 0: wait up to this long to fill it.
    max_queue_delay_ms: float = 0.0
    # Rows waiting at most; a request beyond that is refused (RESOURCE_EXHAUSTED) at once.
    max_queue_size: int = 1024
    # Which replica takes the next batch: least_loaded (fewest rows in flight), round_robin,
    # power_of_two (the less loaded of two picked at random).
    routing: str = "least_loaded"
    # A replica that raises or takes longer than this is taken out of rotation (its batch is
    # retried once on another) and probed until it answers again.
    replica_timeout_s: float = 10.0
    # Largest request message accepted (MiB); bigger ones get INVALID_ARGUMENT.
    max_message_mb: float = 16.0
    # gRPC threads answering requests (each waits for its batch while it is computed).
    threads: int = 64
    tls: TLSConf = field(default_factory=TLSConf)
    # A file holding a token: every call but the health service's then needs the metadata
    # `authorization: Bearer <token>` (else UNAUTHENTICATED). The token is never logged.
    auth_token_file: Optional[str] = None
    # Answers kept for repeated inputs (LRU, keyed by the input's bytes, shape and datatype and
    # the model file's hash); 0: no cache. A hit never reaches a replica.
    cache_size: int = 0
    # Prometheus metrics (/metrics over HTTP) on serve.host:metrics_port; 0: none. With serve.tls
    # or serve.auth_token_file set, /metrics takes the same TLS and token as the protocol's ports.
    metrics_port: int = 8002
    # TensorBoard scalars and a one-line summary in the log every this many seconds.
    log_every_s: float = 10.0
    # On SIGTERM/SIGINT readiness goes false at once, but requests are still taken this long
    # before new ones get UNAVAILABLE: time for a load balancer to stop sending (Triton #6230).
    drain_grace_s: float = 2.0
    # A GPT run (docs/serving.md, "Text generation"): true, a new sequence joins the running
    # batch at its next decode step; false, it waits until every running sequence has ended.
    continuous_batching: bool = True
    # A sequence's KV cache is dropped by its worker after this long without a decode step
    # (a front end that lost track of it); a client's deadline ends a sequence sooner.
    sequence_idle_s: float = 60.0


@dataclass
class GenerateConf:
    """python -m rpc_train.generate serve.run=<GPT run>: sample text in this process."""

    prompt: str = "def "
    # Bytes generated after the prompt.
    max_tokens: int = 200
    # 0: greedy (always the likeliest byte); higher: more varied.
    temperature: float = 0.8
    # > 0: draw among the k likeliest bytes only; 0: among all.
    top_k: int = 0
    # The same seed (and run, prompt and settings) gives the same text.
    seed: int = 0
    # true: a KV cache (each step computes the new byte only); false: the whole window each step.
    kv_cache: bool = True


@dataclass
class LoaderConf:
    """Where batches are made: in each consumer's process (local) or by data workers (service).
    conf/loader/*.yaml comment each setting."""

    name: str = "local"
    workers: int = 1
    prefetch: int = 4
    timeout_s: float = 30.0
    cache_mb: float = 0.0
    routing: str = "least_loaded"
    on_error: str = "raise"
    transform: Any = None
    val_transform: Any = None
    batch_hook: Any = None


@dataclass
class PredictConf:
    """mode=predict: the served run's model (serve.run) over every file of data.root."""

    # The directory the prediction files go to (one Parquet file per split); required.
    out: Optional[str] = None
    # Samples per output file: the unit that is written atomically, and redone after a crash.
    split_size: int = 256


@dataclass
class ModeConf:
    name: str = "pipeline"


@dataclass
class TextSampleConf:
    """data=text: the text the driver generates from the model at each validation."""

    prompt: str = "def "
    # Bytes generated after the prompt.
    length: int = 200
    # Sampling temperature; 0: greedy (the likeliest byte each time).
    temperature: float = 0.8


@dataclass
class DataConf:
    name: str = MISSING
    # Directory holding the torchvision datasets' files (~ is expanded).
    root: str = "data"
    download: bool = False
    # Fraction of the training set held out for validation (seeded split).
    val_fraction: float = 0.1
    # Input shape (channels, height, width) and class count; models read these.
    shape: List[int] = MISSING
    num_classes: int = MISSING
    # Samples in the synthetic dataset.
    size: int = 1024
    # Keep only the first N training samples after the split (smoke runs); null keeps all.
    # data=criteo: read only the first N lines of the file.
    limit: Optional[int] = None
    # Click data (mode=hybrid): rows of each categorical feature's embedding table, and the
    # file under `root` that data=criteo reads.
    table_rows: Optional[List[int]] = None
    file: str = "train.txt"
    # data=imagefolder: the side of the square images its transforms make; data.shape follows it.
    image_size: Optional[int] = None
    # `_target_` nodes of the per-sample transforms of training and validation samples
    # (rpc_train/loader/transforms.py), built on whichever process decodes them; null: none.
    train_transform: Any = None
    val_transform: Any = None
    # data=text: the files under `root` matching `glob`, less those in a folder named in
    # `exclude`; `val_limit` evenly spaced validation windows are kept (null: all).
    glob: str = "**/*"
    exclude: List[str] = field(default_factory=list)
    val_limit: Optional[int] = None
    # data=text: a sample of the model's text at each validation (metrics/text.py); null: none.
    sample: Optional[TextSampleConf] = None


@dataclass
class TrainerConf:
    epochs: int = 1
    # Stop after this many optimizer steps, even mid-epoch; null runs all epochs.
    max_steps: Optional[int] = None
    batch_size: int = 64
    # Log training scalars every N steps (validation runs at the end of each epoch).
    log_every: int = 10
    # Also validate every N steps (mode=pipeline); 0: at the end of each epoch only.
    val_every: int = 0
    # Show progress: a bar on a terminal, a line every log.progress_s seconds elsewhere.
    progress: bool = True
    # Write the trained model as a plain state_dict (model.pt) in the run dir.
    save_model: bool = True
    # The loss of the model's output against the labels (training/loss.py LOSSES); in
    # pipeline mode the last stage computes it.
    loss: str = "cross_entropy"
    # A NaN or infinite loss stops the run (false) or skips that step, counted in
    # train/skipped_steps (true). Either way no optimizer steps on it.
    skip_nonfinite: bool = False


@dataclass
class LogConf:
    # Seconds between the driver's plain progress lines (step, epoch, loss, samples/s, ETA),
    # written when stderr is not a terminal: a file, a pipe, CI, Slurm. A terminal gets tqdm's
    # bar instead; trainer.progress=false shows neither.
    progress_s: float = 10.0


@dataclass
class CheckpointConf:
    # Save under <run dir>/checkpoints/step_<N>/ every N optimizer steps (and always at the
    # end); 0 saves only at the end.
    every_steps: int = 0
    # Keep the newest N checkpoints; older ones are removed after each save.
    keep: int = 2
    # auto: go on from the newest intact checkpoint in the run dir, if any; none: start over;
    # or a path to a checkpoints/step_<N> directory, or to a run dir (its newest one).
    resume: str = "auto"


@dataclass
class Config:
    model: Any = MISSING
    data: DataConf = field(default_factory=DataConf)
    optim: Any = MISSING
    scheduler: Any = None
    mode: ModeConf = field(default_factory=ModeConf)
    loader: LoaderConf = field(default_factory=LoaderConf)
    predict: PredictConf = field(default_factory=PredictConf)
    runtime: RuntimeConf = field(default_factory=RuntimeConf)
    pipeline: PipelineConf = field(default_factory=PipelineConf)
    ps: PSConf = field(default_factory=PSConf)
    serve: ServeConf = field(default_factory=ServeConf)
    generate: GenerateConf = field(default_factory=GenerateConf)
    hybrid: HybridConf = field(default_factory=HybridConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    seed: int = 0
    # "cpu" or "cuda"; with cuda, each rank runs on cuda:(LOCAL_RANK mod its machine's GPUs).
    device: str = "cpu"
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    log: LogConf = field(default_factory=LogConf)


def register_configs() -> None:
    ConfigStore.instance().store(name="schema", node=Config)


# data=text's default root, `${python_stdlib:}`: the running Python's standard library, shown
# resolved in the logged config. Registered on import, not in register_configs: a config sent
# unresolved to another process (the benchmarks' local worlds) resolves there too.
OmegaConf.register_new_resolver("python_stdlib", lambda: sysconfig.get_paths()["stdlib"], replace=True)
