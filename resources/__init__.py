"""Data shipped with RDC Studio: bundled model weights and cards (``models/``), the
sample gallery (``samples/``) and the README screenshot. Read with
:func:`rdc_studio.core.models.resource_dir`, never by a path relative to the source."""
