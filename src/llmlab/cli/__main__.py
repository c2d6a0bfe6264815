"""`python -m llmlab.cli`: the same as the `llmlab` command."""

import sys

from llmlab.cli.main import main

sys.exit(main())
