"""The `isr-dpo` command."""
import sys


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  raise SystemExit(f"isr-dpo: no subcommands yet (got {argv})")
