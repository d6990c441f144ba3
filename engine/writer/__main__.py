"""``python -m engine.writer FD``: the writer process (``engine.writer.server``)."""

from engine.writer.server import _exit_now, main

if __name__ == "__main__":
    _exit_now(main())
