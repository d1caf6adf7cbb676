"""``python -m resumeflow.testing``: run, replay and soak the seeded fault simulator."""

from ._cli import main

raise SystemExit(main())
