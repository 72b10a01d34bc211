"""The command tests share the tool tests' tiny image folder and checkpoint."""
from tools.conftest import image_folder, tiny_checkpoint  # noqa: F401  (fixtures)
