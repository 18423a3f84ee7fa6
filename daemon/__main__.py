"""`python -m daemon` is the `nexus-jobd` command."""

from daemon.cli import main

raise SystemExit(main())
