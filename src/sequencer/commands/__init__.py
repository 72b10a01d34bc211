"""The ``sequencer`` sub-commands, one module each (``add_arguments(parser)``, ``run(args) -> int``); the only place
``argparse`` is used. Each turns its flags into a typed call of the library (``engine``, ``tools``) and bad input
into one line; what several commands share is in :mod:`.common`."""
