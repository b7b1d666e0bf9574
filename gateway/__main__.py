"""`python -m gateway` is `llm-gateway`."""

from gateway.cli import main

raise SystemExit(main())
