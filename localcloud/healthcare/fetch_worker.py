"""``python -m localcloud.healthcare.fetch_worker``: one import worker (see ``fetch``)."""

from __future__ import annotations

import logging

from localcloud.healthcare.fetch import serve

if __name__ == "__main__":
    # pydicom warns about odd files with their values, which can be patient data.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    serve()
