"""The configuration layer every other package stands on: the Hydra YAML groups in this folder, their typed schema
(`configs.schema`), the error type for bad values (`configs.errors`) and the loader that composes them
(`configs.loading`).

This package imports no other package of ours (a test checks it), so models/, parallel/, train/ and launch/ may all
import it without creating a cycle. It ships with the installed package, YAML files included.
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
