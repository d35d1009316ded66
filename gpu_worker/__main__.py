from ..shared.lifecycle import run_then_exit
from .main import main

run_then_exit(main)
