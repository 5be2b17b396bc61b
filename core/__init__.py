"""RDC Studio engine: the Robust Diffusion Classifier in plain PyTorch (no Qt).

Importing the package keeps freed memory inside the process (see
:func:`core.runtime.tune_allocator`; about 2x faster CPU classification on glibc
systems). Set ``RDC_NO_MALLOC_TUNING=1`` to leave the allocator alone.
"""
import os as _os

if not _os.environ.get("RDC_NO_MALLOC_TUNING"):
    from .runtime import tune_allocator as _tune_allocator

    _tune_allocator()
