import sys

try:
    from attnlm.cli import main
except KeyboardInterrupt:  # Ctrl-C while starting up: nothing has begun
    sys.exit(130)

main()
