import sys

try:
    from engine.cli.main import main

    status = main()
except KeyboardInterrupt:  # before main's own handler is in place
    print("interrupted", file=sys.stderr)
    status = 130
sys.exit(status)
