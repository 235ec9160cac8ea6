"""`python -m xnatfs.server [options]`: the same as `xnatfs serve [options]`."""

import argparse
import sys

from . import add_serve_arguments, run_serve


def main() -> int:
    parser = argparse.ArgumentParser(prog="xnatfs serve", description="Serve an XNAT-compatible archive over HTTP.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
