"""python -m t2i.demo ckpt=PATH [key=value ...]: see t2i.demo.app."""

import sys

from t2i.command_line import check_command_line
from t2i.demo.app import main

if __name__ == "__main__":
    check_command_line("demo", sys.argv[1:])  # renamed settings, before Hydra composes
    main()
