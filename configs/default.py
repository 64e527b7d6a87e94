"""The full configuration schema with its defaults (the "FB regularized" ResNet-18 run).

Every field is documented in gdreg/config.py; variant files start from it.
"""

from gdreg.config import base_config


def get_config():
    return base_config()
