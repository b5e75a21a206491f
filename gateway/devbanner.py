"""What ``realtime-gateway dev`` prints on start: the URL, a token, and client snippets.

The snippets are meant to be pasted as they are: the Python one (the ``openai`` SDK),
the Node one (openai-node's ``OpenAIRealtimeWS``, which dials ``wss://`` only, so it is
given for ``dev --tls`` with the ``NODE_EXTRA_CA_CERTS`` it needs), a browser
``WebSocket`` and ``examples/wav_client.py``.  When the Python running the gateway lacks
a package a snippet needs, the banner gives the exact command that installs it into that
Python (``<sys.executable> -m pip install ...``); ``pip install -e '.[dev]'`` installs them
all.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from collections.abc import Collection, Iterable, Sequence

from gateway.devtls import DevCertificates

SNIPPET_MODULES = ("openai", "numpy", "soundfile", "soxr")
"""The modules the printed snippets import (each is also the name of its PyPI package)."""

_PYTHON_SNIPPET_MODULES = ("openai",)


def missing_modules(modules: Iterable[str] = SNIPPET_MODULES) -> list[str]:
    """The names among ``modules`` that this Python cannot import."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def install_line(packages: Sequence[str]) -> str:
    """The shell command that installs ``packages`` from PyPI into this Python."""
    return f"{shlex.quote(sys.executable)} -m pip install {' '.join(packages)}"


def dev_banner(*, version: str, port: int, token: str, upstream: str,
               tls: DevCertificates | None, missing: Collection[str]) -> str:
    """The banner of a ``dev`` gateway on 127.0.0.1:``port`` (``wss://`` when ``tls``).

    ``upstream`` names where sessions go; ``missing`` are the :data:`SNIPPET_MODULES`
    this Python lacks (see :func:`missing_modules`).
    """
    base = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}"
    python_env = f"SSL_CERT_FILE={shlex.quote(str(tls.ca_file))} " if tls else ""
    lines = [
        "",
        f"realtime-gateway {version} (development mode) relaying to {upstream}",
        "",
        f"URL:    {base}/v1/realtime?model=gpt-realtime",
        f"Token:  {token}",
        "        (valid 1 hour; scope language-model-service:use-model)",
    ]
    if tls:
        lines += [
            f"TLS:    certificate for 127.0.0.1 and localhost, valid until "
            f"{tls.not_after:%Y-%m-%d %H:%M} UTC, from the local CA",
            f"        {tls.ca_file}",
        ]
    lines.append("")
    lines += _install_hint([m for m in _PYTHON_SNIPPET_MODULES if m in missing])
    lines.append(f"Python ({python_env}python hello.py):")
    lines += _indent(f"""\
import asyncio, openai
async def main():
    client = openai.AsyncOpenAI(api_key="<token>", websocket_base_url="{base}/v1")
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(session={{"type": "realtime", "output_modalities": ["text"]}})
        await conn.conversation.item.create(item={{"type": "message", "role": "user",
            "content": [{{"type": "input_text", "text": "Hello!"}}]}})
        await conn.response.create()
        async for event in conn:
            print(event.type)
            if event.type == "response.done":
                break
asyncio.run(main())""")
    lines.append("")
    if tls:
        lines += [f"Node (npm install openai ws; "
                  f"NODE_EXTRA_CA_CERTS={shlex.quote(str(tls.ca_file))} node hello.mjs):"]
        lines += _indent(f"""\
import OpenAI from "openai";
import {{ OpenAIRealtimeWS }} from "openai/realtime/ws";
const client = new OpenAI({{ apiKey: "<token>", baseURL: "https://127.0.0.1:{port}/v1" }});
const rt = new OpenAIRealtimeWS({{ model: "gpt-realtime" }}, client);
rt.on("error", (err) => {{ console.error(err.message); process.exitCode = 1; rt.close(); }});
rt.on("event", (event) => console.log(event.type));
rt.on("session.created", () => {{
  rt.send({{ type: "session.update",
            session: {{ type: "realtime", output_modalities: ["text"] }} }});
  rt.send({{ type: "conversation.item.create", item: {{ type: "message", role: "user",
    content: [{{ type: "input_text", text: "Hello!" }}] }} }});
  rt.send({{ type: "response.create" }});
}});
rt.on("response.done", () => rt.close());""")
    else:
        lines += ["Node (openai): it dials wss:// only; run `realtime-gateway dev --tls` for its "
                  "snippet."]
    http = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    curl_ca = f"--cacert {shlex.quote(str(tls.ca_file))} " if tls else ""
    lines += [
        "",
        "Browser:",
        f'    new WebSocket("{base}/language-model-service/ws/v1/open-ai/realtime'
        '?model=gpt-realtime",',
        '                  ["Bearer-" + token])',
        "",
        "Client secret for a browser (your backend mints it with the token; the browser never",
        "holds the token):",
        f"    curl {curl_ca}-s {http}/v1/realtime/client_secrets -H \"Authorization: Bearer "
        "<token>\" \\",
        '      -H "Content-Type: application/json" -d \'{"expires_after": {"anchor": '
        '"created_at", "seconds": 300}}\'',
        f"Python ({python_env}python mint.py):",
        "    import openai",
        f'    client = openai.OpenAI(api_key="<token>", base_url="{http}/v1")',
        "    ek = client.realtime.client_secrets.create(",
        '        expires_after={"anchor": "created_at", "seconds": 300}).value',
        "    print(ek)",
        "Then, in the browser:",
        f'    new WebSocket("{base}/v1/realtime?model=gpt-realtime",',
        '                  ["realtime", "openai-insecure-api-key." + ek])',
        "",
    ]
    lines += _install_hint([m for m in SNIPPET_MODULES if m in missing])
    lines += ["A recording of speech (WAV, FLAC, Ogg, MP3; any rate) through the gateway:",
              f"    {python_env}python examples/wav_client.py --url {base}/v1 --token <token> "
              "input.wav reply.wav", ""]
    return "\n".join(lines)


def _install_hint(packages: Sequence[str]) -> list[str]:
    if not packages:
        return []
    return [f"{' and '.join(packages)} not installed in this Python ({sys.executable}); "
            "install with:", f"    {install_line(packages)}"]


def _indent(code: str) -> list[str]:
    return ["    " + line for line in code.splitlines()]


__all__ = ["SNIPPET_MODULES", "dev_banner", "install_line", "missing_modules"]
