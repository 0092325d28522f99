"""``python -m dicomflow``: the command-line interface (see ``dicomflow.cli``)."""

from dicomflow.cli import main

raise SystemExit(main())
