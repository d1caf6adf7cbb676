from ._main import main

main(prog_name="resumeflow")
