"""Everything that touches disk: jaxlm model directories, training checkpoints, Hugging Face
model directories (one module per family), and ``read_model`` for any path that names a model."""

from jaxlm.io.atomic import atomic_dir, check_destination  # noqa: F401
from jaxlm.io.checkpoints import TrainCheckpoints, is_workdir  # noqa: F401
from jaxlm.io.export import export  # noqa: F401
from jaxlm.io.model_dir import is_model_dir, save_model  # noqa: F401
from jaxlm.io.read import read_model  # noqa: F401
