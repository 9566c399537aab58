"""Benchmarks run by ``rnnkern bench``: one module per suite, timed by :mod:`.runner`."""
