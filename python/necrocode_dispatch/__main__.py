"""``python -m necrocode_dispatch``: the ``necrocode-dispatch`` command."""

from necrocode_dispatch.cli import console_main

console_main()
