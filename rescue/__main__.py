import sys

from .errors import install_signal_handlers

install_signal_handlers()   # before the heavier imports: SIGTERM/SIGHUP clean up like Ctrl-C from the start

try:
    from .cli import main
except KeyboardInterrupt as exc:   # a signal while starting: nothing was done yet
    sys.stderr.write(f"rescue: interrupted ({getattr(exc, 'name', 'SIGINT')})\n")
    sys.exit(getattr(exc, "exit_code", 130))

main()
