"""medray's Ray Train backend: every worker learns the others' addresses, and nothing more.

``MultiWorkerMirroredStrategy`` finds its peers in the ``TF_CONFIG`` environment variable; all
a backend has to do is give each worker the list of every worker's address and its own index
before the training loop starts. Ray's ``TensorflowConfig`` does that too, but it lives in
``ray.train.tensorflow``, whose package ``__init__`` imports TensorFlow, and Ray pickles the
config by reference: Ray Train's controller imported TensorFlow (with scikit-learn, 2-3 s on
2 cores) only to unpickle its config, the job driver imported it to build the trainer, and
each worker imported it (scikit-learn included) in the backend's set-up, before medray's loop
could import it the quick way (``workers.models.import_tensorflow``). This backend imports no
TensorFlow anywhere; the loop imports it once, in the workers, where it is used
(BENCHMARKS.md "Start-up"). It also leaves ``TF_USE_LEGACY_KERAS`` alone, which Ray's sets:
medray builds its models with Keras 3 itself.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Any

from ray.train.backend import Backend, BackendConfig


@dataclass
class TensorflowBackendConfig(BackendConfig):
    """The ``backend_config`` of medray's ``DataParallelTrainer``."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _TensorflowBackend


def tf_config(addresses: list[str], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` among workers at ``addresses`` (``host:port``)."""
    if not 0 <= index < len(addresses):
        raise ValueError(f"worker index {index} outside the {len(addresses)} workers")
    return json.dumps({"cluster": {"worker": list(addresses)},
                       "task": {"type": "worker", "index": index}})


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets as gRPC expects it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address() -> str:
    """This worker's node address and a port free on it now, for the strategy's gRPC server
    (free when asked: TensorFlow binds it moments later, as with Ray's own backend)."""
    import ray

    with socket.socket(socket.AF_INET6 if ":" in (host := ray.util.get_node_ip_address())
                       else socket.AF_INET) as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return host_port(host, port)


def _set_tf_config(addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = tf_config(addresses, index)


class _TensorflowBackend(Backend):
    def on_start(self, worker_group: Any, backend_config: BackendConfig) -> None:
        import ray

        addresses = worker_group.execute(_address)
        # one call per worker, awaited together, so a worker that fails says so here
        ray.get([worker_group.execute_single_async(index, _set_tf_config,
                                                   addresses=addresses, index=index)
                 for index in range(len(worker_group))])
