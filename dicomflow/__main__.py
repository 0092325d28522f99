"""``python -m dicomflow``: the command-line interface (see ``dicomflow.ops.cli``)."""

from dicomflow.ops.cli import main

raise SystemExit(main())
