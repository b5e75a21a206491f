"""openai-agents (Python) ``RealtimeRunner`` through the gateway; runs in ``.venv-agents``.

openai-agents pins ``websockets<17`` while the gateway needs ``>=17.4``, so this client runs
as a subprocess of ``tests/sdk/test_python_sdks.py`` in its own virtualenv.  Spec on stdin:
``{"url": "ws://127.0.0.1:P/v1/realtime?model=M", "token": "..."}``; the token goes in
``model_config["api_key"]`` (sent as ``Authorization: Bearer``).  One spoken turn and one
function tool call; prints one JSON line ``{"events", "audio_bytes", "transcripts",
"tool_calls", "agents_version"}``.  Exits 3 when the turn does not complete in 20 s.
"""

from __future__ import annotations

import asyncio
import json
import sys
from importlib.metadata import version
from typing import Any

from agents import function_tool  # type: ignore[import-not-found,unused-ignore]
from agents.realtime import (  # type: ignore[import-not-found,unused-ignore]
    RealtimeAgent,
    RealtimeRunner,
)

TURN_SECONDS = 20.0

tool_calls: list[str] = []


@function_tool  # type: ignore[untyped-decorator,unused-ignore]
def get_time(city: str) -> str:
    """The local time in a city."""
    tool_calls.append(city)
    return "noon"


async def converse(url: str, token: str) -> dict[str, Any]:
    agent = RealtimeAgent(name="Assistant", instructions="Be brief.", tools=[get_time])
    runner = RealtimeRunner(starting_agent=agent, config={
        "model_settings": {"model_name": "gpt-realtime", "output_modalities": ["audio"]}})
    session = await runner.run(model_config={"api_key": token, "url": url})
    events: list[str] = []
    transcripts: list[str] = []
    audio_bytes = 0
    turns = 0
    async with session:
        await session.send_message("Hello from agents-python")
        async with asyncio.timeout(TURN_SECONDS):
            async for event in session:
                events.append(event.type)
                if event.type == "audio":
                    audio_bytes += len(event.audio.data)
                elif event.type == "raw_model_event" and event.data.type == "raw_server_event":
                    raw = event.data.data
                    if raw.get("type") == "response.output_audio_transcript.done":
                        transcripts.append(raw["transcript"])
                elif event.type == "error":
                    raise RuntimeError(f"session error: {event.error}")
                elif event.type == "agent_end":
                    turns += 1
                    if turns == 1:
                        await session.send_message("What is the time? Use get_time.")
                    elif len(transcripts) >= 2:
                        break
    return {"events": sorted(set(events)), "audio_bytes": audio_bytes,
            "transcripts": transcripts, "tool_calls": tool_calls,
            "agents_version": version("openai-agents")}


def main() -> int:
    spec = json.loads(sys.stdin.read())
    try:
        report = asyncio.run(converse(spec["url"], spec["token"]))
    except TimeoutError:
        print(f"agents_python_client: no completed turn within {TURN_SECONDS} s",
              file=sys.stderr)
        return 3
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
