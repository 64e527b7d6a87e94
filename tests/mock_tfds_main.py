"""Runs ``python -m gdreg.main`` under ``tfds.testing.mock_data``: mock_tfds_main.py N ARGS...

TFDS's mock replaces the files of a prepared dataset with N random examples per split, so
the real loading code runs offline. The network probe before a download is bypassed, since
mock_data makes the download itself a no-op.
"""

import sys

import tensorflow_datasets as tfds
from absl import app

from gdreg import main
from gdreg.data import sources

num_examples = int(sys.argv.pop(1))
sources._download_host_unreachable = lambda url, **kwargs: None
with tfds.testing.mock_data(num_examples=num_examples):
    app.run(lambda argv: sys.exit(main.main(argv)))
