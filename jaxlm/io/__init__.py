"""Everything that touches disk: jaxlm model directories, training checkpoints, Hugging Face
model directories (one module per family), and ``read_model`` for any path that names a model."""

from jaxlm.io.quiet import quiet_orbax_errors

quiet_orbax_errors()  # before any orbax write: a failed one raises; its threads' tracebacks are noise

from jaxlm.io.atomic import atomic_dir, check_destination  # noqa: E402, F401
from jaxlm.io.checkpoints import TrainCheckpoints, is_workdir  # noqa: E402, F401
from jaxlm.io.export import export  # noqa: E402, F401
from jaxlm.io.model_dir import is_model_dir, save_model  # noqa: E402, F401
from jaxlm.io.read import read_model  # noqa: E402, F401
