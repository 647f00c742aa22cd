"""`python -m tl_project ...` runs the command line."""

from tl_project.cli import console

if __name__ == "__main__":
    console()
