"""``python -m resumeflow.cli``: the ``resumeflow`` command without an installed script."""

from ._main import main

main(prog_name="resumeflow")
