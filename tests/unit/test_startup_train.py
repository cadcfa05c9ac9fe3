"""The train job's driver and Ray Train's controller import no TensorFlow (issue 17).

Ray's TensorFlow backend lives in ``ray.train.tensorflow``, whose ``__init__`` imports
TensorFlow: with it the driver (building the trainer) and Ray Train's controller (unpickling
the backend config) each imported TensorFlow, and the worker imported it with scikit-learn
before medray's loop ran. medray's own backend (``cluster/train/backend.py``) imports nothing
of TensorFlow; the workers import it once, the quick way.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest

from medray.cluster.train import backend

# builds the driver's trainer the way the job does, with Ray Data's datasets and Ray Train's
# fit() replaced (no cluster needed); unpickles the trainer's backend config in a fresh
# process, as Ray Train's controller does; says what each process imported
_DRIVER = """
import pickle, sys
from types import SimpleNamespace
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from medray.cluster.train import data, job
from medray.cluster.train.plan import DatasetFacts, TrainPlan
from medray.cluster.train.weights import InitWeights
from medray.workers.specs import TrainSpec

class Built(Exception):
    pass

def fit(self):
    # what Ray Train hands its controller
    from ray.train.v2._internal.constants import get_env_vars_to_propagate
    check = get_env_vars_to_propagate().get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S', 'unset')
    sys.stdout.buffer.write(pickle.dumps(self.backend_config).hex().encode() + b'\\n')
    print(check)
    raise Built(type(self).__name__)

DataParallelTrainer.fit = fit
data.dataset = lambda *a, **k: SimpleNamespace()
facts = DatasetFacts.from_manifest('d', 1, {'labels': ['a', 'b'], 'multi_label': False,
                                            'image_size': 28, 'channels': 1})
plan = TrainPlan(spec=TrainSpec(dataset='d', model='m'), lake_uri='/lake', job_id='j1',
                 train_id='t1', data=facts, train_rows=100, val_split='val',
                 init=InitWeights('none', 'none'), class_weights=None)
try:
    job._fit(SimpleNamespace(uri='/lake'), plan, ['part-00000.parquet'])
except Built as built:
    print(built)
print('tensorflow' in sys.modules, 'sklearn' in sys.modules)
"""

_CONTROLLER = """
import pickle, sys
config = pickle.loads(bytes.fromhex(sys.stdin.read()))
print(type(config).__name__, config.backend_cls.__name__, 'tensorflow' in sys.modules)
"""

_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"}


def test_train_driver_and_controller_import_no_tensorflow():
    out = subprocess.run([sys.executable, "-c", _DRIVER], capture_output=True, text=True,
                         timeout=300, check=True, env=_ENV)
    pickled, check, built, has_tf, has_sklearn = out.stdout.split()
    assert [built, has_tf, has_sklearn] == ["DataParallelTrainer", "False", "False"], \
        out.stderr[-2000:]
    assert check == "0.5"  # the controller checks its workers every 0.5 s, not Ray's 2 s
    controller = subprocess.run([sys.executable, "-c", _CONTROLLER], input=pickled,
                                capture_output=True, text=True, timeout=300, check=True,
                                env=_ENV)
    assert controller.stdout.split() == ["TensorflowBackendConfig", "_TensorflowBackend",
                                         "False"], controller.stderr[-2000:]


def test_a_health_check_interval_set_on_the_cluster_wins():
    out = subprocess.run([sys.executable, "-c", _DRIVER], capture_output=True, text=True,
                         timeout=300, check=True,
                         env={**_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"})
    assert out.stdout.split()[1] == "3", out.stderr[-2000:]


def test_tf_config_names_every_worker_and_this_one():
    addresses = ["10.0.0.1:40001", "10.0.0.2:40002", "[fe80::1]:40003"]
    for index in range(3):
        assert json.loads(backend.tf_config(addresses, index)) == {
            "cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    with pytest.raises(ValueError, match="index 3 outside the 3 workers"):
        backend.tf_config(addresses, 3)


def test_host_port_brackets_ipv6_only():
    assert backend.host_port("10.1.2.3", 5) == "10.1.2.3:5"
    assert backend.host_port("fe80::1", 5) == "[fe80::1]:5"


def test_the_backend_config_pickles_by_reference_to_medray():
    config = pickle.loads(pickle.dumps(backend.TensorflowBackendConfig()))
    assert config.backend_cls.__module__ == "medray.cluster.train.backend"
