"""What a study's trial imports, imported once by the sweeper's template process (agecls.sweep.template)
so that each forked trial finds it in memory. Importing these runs no tensor operation and touches no GPU.
A module missing here costs each trial its import time, nothing else."""

import matplotlib

matplotlib.use("Agg")  # a trial draws figures into files

import albumentations  # noqa: E402, F401
import albumentations.pytorch  # noqa: E402, F401
import git  # noqa: E402, F401 - mlflow records a run's source commit with it
import lightning  # noqa: E402, F401
import matplotlib.pyplot  # noqa: E402, F401
import mlflow  # noqa: E402, F401
import mlflow.store.tracking.sqlalchemy_store  # noqa: E402, F401
import optuna  # noqa: E402, F401
import pandas  # noqa: E402, F401
import pyarrow.dataset  # noqa: E402, F401 - pandas' and mlflow's file readers
import pyarrow.parquet  # noqa: E402, F401
import setproctitle  # noqa: E402, F401
import torchmetrics  # noqa: E402, F401
from hydra.core.plugins import Plugins  # noqa: E402
from optuna.storages import RDBStorage  # noqa: E402, F401 - and the SQLAlchemy and alembic it imports
from PIL import Image  # noqa: E402

import agecls.cli.train  # noqa: E402, F401
import agecls.data.cache  # noqa: E402, F401
import agecls.data.prepare  # noqa: E402, F401
import agecls.evaluation.postfit  # noqa: E402, F401
import agecls.evaluation.splits  # noqa: E402, F401
import agecls.training.task  # noqa: E402, F401
import agecls.training.trainer  # noqa: E402, F401
import agecls.training.validation  # noqa: E402, F401

Image.init()  # the image format plugins
Plugins.instance()  # Hydra's plugin discovery (launchers, sweepers), which scans hydra_plugins
