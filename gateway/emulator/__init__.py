"""The Realtime protocol emulator: a stand-in upstream for development and tests (CONTRACT §7).

It speaks the **GA** OpenAI Realtime WebSocket protocol (event shapes of openai-python
``src/openai/types/realtime/*.py``) well enough for the official SDKs (openai-python
``client.realtime.connect``, openai-node, @openai/agents, openai-agents-python) to hold a
whole conversation with it: ``session.created``/``session.update``, audio appends with an
energy VAD, commits, text items, streamed audio/text responses, function calls, cancels.
It is built on the ``websockets`` asyncio server; one
:class:`~gateway.emulator.server.Emulator` serves many concurrent sessions, each of which
may be told to misbehave.  The key is never recorded or logged, and nothing is logged per
frame.

This package re-exports nothing; import from its modules:

* :mod:`~gateway.emulator.server`: ``Emulator`` (the server: its endpoints, including
  ``GET /_emulator/sessions``) and ``serve_forever`` (the ``emulator`` command).
* :mod:`~gateway.emulator.handshake`: credentials, ``model``, refusals, beta clients.
* :mod:`~gateway.emulator.session`: one session's event handlers, on any transport.
* :mod:`~gateway.emulator.socket`: one WebSocket connection serving a session.
* :mod:`~gateway.emulator.schema`: the session object and ``session.update`` validation.
* :mod:`~gateway.emulator.conversation`: items, their prices, item operations.
* :mod:`~gateway.emulator.vad`: the energy server VAD.
* :mod:`~gateway.emulator.plan`: what a response says (text, function calls).
* :mod:`~gateway.emulator.responses`: streaming a response, cancels, ``response.done``.
* :mod:`~gateway.emulator.voice`: what spoken replies sound like.
* :mod:`~gateway.emulator.tokens`: the exact token accounting (``text_tokens`` …).
* :mod:`~gateway.emulator.faults`: the ``fault-*`` words of the ``model`` value.
* :mod:`~gateway.emulator.records`: ``SessionRecord``, what tests read back.
"""
