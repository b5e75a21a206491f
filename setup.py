"""Build hook for the optional C frame scan (``gateway/_framescan.c``, issue 16).

Everything else is in ``pyproject.toml``.  The extension is ``optional``: where it cannot be
compiled (no C compiler or Python headers) the install goes on without it and the relay
uses its pure-Python frame loop (``gateway.relay.FRAMESCAN`` is then ``None``).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("gateway._framescan", ["gateway/_framescan.c"], optional=True,
                             extra_compile_args=["-O2"])])
