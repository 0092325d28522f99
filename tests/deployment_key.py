"""One deployment key file for the test session, for settings built from a dict."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from dicomflow import keys

_FOLDER = tempfile.mkdtemp(prefix="dicomflow-test-key-")
atexit.register(shutil.rmtree, _FOLDER, True)
KEY_FILE = os.path.join(_FOLDER, "deployment.key")
keys.write_key_file(KEY_FILE)
