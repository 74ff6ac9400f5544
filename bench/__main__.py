"""`python -m bench SUITE [options]`: see bench/README.md."""

from bench.cli import main

raise SystemExit(main())
