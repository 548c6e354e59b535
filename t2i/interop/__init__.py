"""Other systems' checkpoints in and out (EasyNLP's pai-painter): `python -m t2i.interop --help`."""
