"""`python -m huse_pipeline ...` is `huse ...`, so that launchers that run modules (torchrun) can start it."""
from cli import main

if __name__ == "__main__":
    main(prog_name="huse")
