"""MCP scenarios against a real heist cluster, driven by the official Python `mcp` SDK.

Run by coordinator/tests/cluster/mcp.rs: `python scenarios.py <scenario>` with the cluster in
the environment (HEIST_URL: the coordinator's base URL, HEIST_TOKEN, ...). A scenario asserts
what it can see from the client side and exits non-zero on failure; what only the host can see
(a killed process) it prints as `key=value` lines for the Rust test to check.
"""

from __future__ import annotations

import base64
import os
import sys

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

URL = os.environ.get("HEIST_URL", "")


def report(key: str, value: str) -> None:
    print(f"{key}={value}", flush=True)


def http_client(token: str | None) -> httpx2.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60.0, read=300.0))


def connect(token: str, mode: str = "auto") -> Client:
    transport = streamable_http_client(f"{URL}/mcp", http_client=http_client(token))
    return Client(transport, mode=mode)


def structured(result) -> dict:
    assert not result.is_error, f"tool error: {result.content}"
    assert result.structured_content is not None, result
    return result.structured_content


async def new_session(client: Client) -> str:
    created = structured(await client.call_tool("session_create", {}))
    assert created["state"] == "SESSION_STATE_READY", created
    return created["session_id"]


async def tool_names(client: Client) -> list[str]:
    return [t.name for t in (await client.list_tools()).tools]


async def basics(mode: str) -> None:
    """Lists tools, opens a session, writes then reads a file, streams exec output."""
    async with connect(os.environ["HEIST_TOKEN"], mode) as client:
        report("protocol", client.protocol_version)
        names = await tool_names(client)
        for expected in ["session_create", "session_list", "session_close", "checkpoint_create",
                         "checkpoint_list", "checkpoint_restore", "session_fork", "agent_list",
                         "agent_turn", "fs_write", "fs_read", "exec", "run_python", "echo"]:
            assert expected in names, f"{expected} missing from {names}"
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert "session_id" in tools["fs_read"].input_schema["required"]
        assert tools["session_create"].output_schema is not None

        session = await new_session(client)
        listed = structured(await client.call_tool("session_list", {}))
        assert session in [s["session_id"] for s in listed["sessions"]], listed

        wrote = await client.call_tool(
            "fs_write", {"session_id": session, "path": "notes/plan.txt", "content": "vault at 3am"})
        assert not wrote.is_error, wrote.content
        read = await client.call_tool("fs_read", {"session_id": session, "path": "notes/plan.txt"})
        assert not read.is_error, read.content
        assert read.content[0].text == "vault at 3am", read.content

        # exec: progress notifications carry the output before the result arrives.
        events: list[str] = []

        async def progress(value: float, total: float | None, message: str | None) -> None:
            events.append(f"progress:{message}")

        result = await client.call_tool(
            "exec", {"session_id": session, "command": "echo one; sleep 0.2; echo two"},
            progress_callback=progress)
        events.append("result")
        assert not result.is_error, result.content
        out = structured(result)["stdout"]
        assert "one" in out and "two" in out, out
        streamed = "".join(e.removeprefix("progress:") for e in events if e.startswith("progress:"))
        assert "one" in streamed and "two" in streamed, events
        assert events[-1] == "result" and events[0].startswith("progress:"), events

        # A tool error is an isError result that says what went wrong.
        missing = await client.call_tool("fs_read", {"session_id": session, "path": "nope.txt"})
        assert missing.is_error, missing

        # A retry with the same request id is a replay, not a second run.
        meta = {"io.heist/requestId": f"mcp-retry-{session}"}
        args = {"session_id": session, "path": "log.txt", "content": "x\n", "append": True}
        first = await client.call_tool("fs_write", args, meta=meta)
        again = await client.call_tool("fs_write", args, meta=meta)
        assert not first.is_error and not again.is_error
        assert again.meta and again.meta.get("io.heist/replayed") is True, again.meta
        log = await client.call_tool("fs_read", {"session_id": session, "path": "log.txt"})
        assert log.content[0].text == "x\n", log.content

        closed = structured(await client.call_tool("session_close", {"session_id": session}))
        assert closed["state"] in ("SESSION_STATE_CLOSED", "SESSION_STATE_CLOSING"), closed
    report("ok", "basics")


async def cancel() -> None:
    """Starts a long command, cancels the call once it runs; the host checks it is killed."""
    mark = os.environ["HEIST_MARK"]
    async with connect(os.environ["HEIST_TOKEN"], "2026-07-28") as client:
        session = await new_session(client)
        report("session", session)
        started = anyio.Event()

        async def progress(value: float, total: float | None, message: str | None) -> None:
            if message and "started" in message:
                started.set()

        async with anyio.create_task_group() as tg:
            async def call() -> None:
                await client.call_tool(
                    "exec", {"session_id": session, "command": f"echo started; sleep 3600; : {mark}"},
                    progress_callback=progress)
                raise AssertionError("the call finished although it was cancelled")

            tg.start_soon(call)
            with anyio.fail_after(60):
                await started.wait()
            report("started", "yes")
            tg.cancel_scope.cancel()
        # The session still answers after the cancellation.
        echo = await client.call_tool("echo", {"session_id": session, "msg": "still here"})
        assert not echo.is_error, echo.content
    report("ok", "cancel")


async def auth() -> None:
    """No token: 401 naming the metadata; discovery documents; a token from /oauth/token."""
    async with http_client(None) as http:
        resp = await http.post(f"{URL}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                               headers={"Accept": "application/json, text/event-stream"})
        assert resp.status_code == 401, resp.status_code
        challenge = resp.headers["www-authenticate"]
        assert challenge.startswith("Bearer ") and "resource_metadata=" in challenge, challenge
        metadata_url = challenge.split('resource_metadata="', 1)[1].split('"', 1)[0]

        resource = (await http.get(metadata_url)).json()
        assert resource["resource"] == f"{URL}/mcp", resource
        assert resource["authorization_servers"] == [URL], resource
        assert (await http.get(f"{URL}/.well-known/oauth-protected-resource")).status_code == 200

        server = (await http.get(f"{URL}/.well-known/oauth-authorization-server")).json()
        assert server["issuer"] == URL, server
        assert "client_credentials" in server["grant_types_supported"], server
        token_url = server["token_endpoint"]

        client_id, secret = os.environ["HEIST_CLIENT_ID"], os.environ["HEIST_CLIENT_SECRET"]
        bad = await http.post(token_url, data={"grant_type": "client_credentials",
                                               "client_id": client_id, "client_secret": "wrong"})
        assert bad.status_code == 401 and bad.json()["error"] == "invalid_client", bad.text
        unsupported = await http.post(token_url, data={"grant_type": "password"})
        assert unsupported.json()["error"] == "unsupported_grant_type", unsupported.text
        other = await http.post(token_url, data={"grant_type": "client_credentials", "client_id": client_id,
                                                 "client_secret": secret, "resource": "https://elsewhere.example/mcp"})
        assert other.json()["error"] == "invalid_target", other.text

        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        issued = await http.post(token_url, data={"grant_type": "client_credentials",
                                                  "scope": "sessions:read tools:read"},
                                 headers={"Authorization": f"Basic {basic}"})
        assert issued.status_code == 200, issued.text
        body = issued.json()
        assert body["token_type"] == "Bearer" and body["scope"] == "sessions:read tools:read", body
        assert issued.headers["cache-control"] == "no-store"
        token = body["access_token"]

        # A token for another audience (a worker's credential audience) is refused.
        foreign = os.environ["HEIST_FOREIGN_TOKEN"]
        resp = await http.post(f"{URL}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                               headers={"Accept": "application/json, text/event-stream",
                                        "Authorization": f"Bearer {foreign}"})
        assert resp.status_code == 401, resp.status_code

        # Origin validation: a browser origin that is not allowed is refused.
        resp = await http.post(f"{URL}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                               headers={"Accept": "application/json, text/event-stream",
                                        "Authorization": f"Bearer {token}", "Origin": "https://evil.example"})
        assert resp.status_code == 403, resp.status_code

    async with connect(token) as client:
        names = await tool_names(client)
        assert "session_list" in names, names
    report("ok", "auth")


async def scopes() -> None:
    """A token without tool scopes does not see worker tools and cannot call them; one with
    tools:fs sees and calls only the fs tools; a session's tool policy narrows further."""
    async with connect(os.environ["HEIST_LIMITED_TOKEN"], "legacy") as client:
        names = await tool_names(client)
        assert "session_create" in names and "session_list" in names, names
        assert "fs_write" not in names and "exec" not in names, names
        assert "checkpoint_create" not in names, names
        session = await new_session(client)
        try:
            result = await client.session.call_tool(
                "fs_write", {"session_id": session, "path": "a.txt", "content": "no"})
        except MCPError as err:
            assert "tools:call" in err.message, err.message
            report("refused", err.message)
        else:
            raise AssertionError(f"fs_write was allowed: {result}")

    # A token with only the files category sees and calls the fs tools, nothing else.
    async with connect(os.environ["HEIST_FS_TOKEN"]) as client:
        names = await tool_names(client)
        assert "fs_write" in names and "fs_read" in names, names
        assert "exec" not in names and "calc" not in names and "echo" not in names, names
        session = await new_session(client)
        wrote = await client.call_tool(
            "fs_write", {"session_id": session, "path": "a.txt", "content": "yes"})
        assert not wrote.is_error, wrote.content
        try:
            result = await client.call_tool("exec", {"session_id": session, "command": "true"})
        except MCPError as err:
            assert "tools:exec" in err.message, err.message
            report("refused_exec", err.message)
        else:
            raise AssertionError(f"exec was allowed: {result}")

        # A session created with a tool policy refuses the rest, even what the token allows.
        created = structured(await client.call_tool(
            "session_create", {"allowed_tools": ["fs.read"]}))
        assert created["allowed_tools"] == ["fs.read"], created
        narrow = created["session_id"]
        refused = await client.call_tool(
            "fs_write", {"session_id": narrow, "path": "b.txt", "content": "no"})
        assert refused.is_error, refused
        assert "allows only fs.read" in refused.content[0].text, refused.content
        report("refused_policy", refused.content[0].text)
    report("ok", "scopes")


async def isolation() -> None:
    """Two principals see only their own sessions."""
    async with connect(os.environ["HEIST_TOKEN"]) as alice, connect(os.environ["HEIST_OTHER_TOKEN"]) as bob:
        mine = await new_session(alice)
        theirs = await new_session(bob)
        alice_sees = [s["session_id"] for s in structured(await alice.call_tool("session_list", {}))["sessions"]]
        bob_sees = [s["session_id"] for s in structured(await bob.call_tool("session_list", {}))["sessions"]]
        assert mine in alice_sees and theirs not in alice_sees, alice_sees
        assert theirs in bob_sees and mine not in bob_sees, bob_sees
        peek = await bob.call_tool("fs_list", {"session_id": mine})
        assert peek.is_error, peek
        assert peek.meta and peek.meta.get("io.heist/code") == "NotFound", peek.meta
    report("ok", "isolation")


async def stdio() -> None:
    """The SDK launches `heistctl mcp` as a stdio server: list tools and run calls through it,
    on the current revision and with the older handshake."""
    params = StdioServerParameters(
        command=os.environ["HEIST_HEISTCTL"],
        args=["mcp", "--coordinator", URL],
        env={"HEIST_TOKEN": os.environ["HEIST_TOKEN"], "PATH": os.environ.get("PATH", "")},
    )
    for mode in ("auto", "legacy"):
        await stdio_in(params, mode)


async def stdio_in(params: StdioServerParameters, mode: str) -> None:
    async with Client(params, mode=mode) as client:
        names = await tool_names(client)
        assert "session_create" in names and "fs_read" in names, names
        session = await new_session(client)
        result = await client.call_tool("echo", {"session_id": session, "msg": "over stdio"})
        assert not result.is_error, result.content
        assert result.structured_content == {"msg": "over stdio"}, result.structured_content
        chunks: list[str] = []

        async def progress(value: float, total: float | None, message: str | None) -> None:
            chunks.append(message or "")

        out = await client.call_tool("exec", {"session_id": session, "command": "echo relayed"},
                                     progress_callback=progress)
        assert not out.is_error and "relayed" in "".join(chunks), (out.content, chunks)
    report("ok", "stdio")


async def traced() -> None:
    """A call whose `_meta` carries a W3C traceparent joins that trace; the result names it."""
    async with connect(os.environ["HEIST_TOKEN"]) as client:
        session = await new_session(client)
        result = await client.call_tool(
            "echo", {"session_id": session, "msg": "traced"},
            meta={"traceparent": os.environ["HEIST_TRACEPARENT"], "tracestate": "heist=test"})
        assert not result.is_error, result.content
        report("trace_id", (result.meta or {}).get("io.heist/traceId", ""))


SCENARIOS = {
    "basics": lambda: basics("auto"),
    "basics-legacy": lambda: basics("legacy"),
    "cancel": cancel,
    "auth": auth,
    "scopes": scopes,
    "isolation": isolation,
    "stdio": stdio,
    "traced": traced,
}

if __name__ == "__main__":
    anyio.run(SCENARIOS[sys.argv[1]])
