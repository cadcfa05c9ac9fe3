"""The train job's driver imports TensorFlow without scikit-learn (issue 17): Ray Train's
TensorFlow backend imports TensorFlow on the driver when the trainer is built, and Keras would
pull scikit-learn in with it, about 1.2 s of the job's critical path on 2 cores."""

from __future__ import annotations

import subprocess
import sys

# builds the driver's trainer the way the job does, with Ray Data's datasets and Ray Train's
# fit() replaced (no cluster needed), and says what the driver process imported
_DRIVER = """
import sys
from types import SimpleNamespace
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from medray.cluster.train import data, job

class Built(Exception):
    pass

def fit(self):
    raise Built(type(self).__name__)

DataParallelTrainer.fit = fit
data.dataset = lambda *a, **k: SimpleNamespace(materialize=lambda: 'val rows')
spec = SimpleNamespace(gpus_per_worker=0, workers=1, cpus_per_worker=1.0)
plan = SimpleNamespace(spec=spec, data=SimpleNamespace(labels=('a', 'b'), multi_label=False),
                       cached=False, val_split='val', train_id='t1', job_id='j1')
try:
    job._fit(None, plan, ['part-00000.parquet'])
except Built as built:
    print(built)
print('tensorflow' in sys.modules, 'sklearn' in sys.modules)
"""


def test_train_driver_imports_tensorflow_without_scikit_learn():
    out = subprocess.run([sys.executable, "-c", _DRIVER], capture_output=True, text=True,
                         timeout=300, check=True, env={"TF_CPP_MIN_LOG_LEVEL": "3",
                                                        "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["TensorflowTrainer", "True", "False"], out.stderr[-2000:]
