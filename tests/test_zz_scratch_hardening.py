import httpx, json
async def test_probe(client, upstream, alice):
    upstream.post("/chat/completions").mock(return_value=httpx.Response(200, json={"choices":[{"message":{"role":"assistant","content":"x"}}]}))
    for sid in ["a\x00b", "x"*10000, "\ud800", "sess_" + "é"]:
        try:
            r = await client.post("/v1/chat/completions", headers=alice.headers, content=json.dumps({"model":"m","session_id":sid,"messages":[{"role":"user","content":"hi"}]}))
            print("body", repr(sid[:10]), r.status_code, r.text[:200])
        except Exception as e:
            print("body EXC", repr(sid[:10]), type(e), e)
    for path in ["/v1/chat/sessions/a%00b", "/v1/chat/sessions/" + "x"*10000, "/v1/chat/sessions/%ED%A0%80", "/v1/chat/sessions/%ff", "/v1/chat/sessions/a%00b/messages"]:
        r = await client.get(path, headers=alice.headers)
        print("path", path[:40], r.status_code, r.text[:200])
    r = await client.post("/v1/chat/completions", headers={**alice.headers, "x-session-id": "a\x00b"}, json={"model":"m","messages":[{"role":"user","content":"hi"}]})
    print("hdr", r.status_code, r.text[:200])
    # chunked body over limit
    async def gen():
        for _ in range(12):
            yield b"x" * 1024 * 1024
    r = await client.post("/v1/chat/completions", headers=alice.headers, content=gen())
    print("chunked", r.status_code, r.text[:200])
    r = await client.post("/v1/files", headers=alice.headers, content=gen())
    print("chunked passthrough", r.status_code, r.text[:200])
    r = await client.post("/v1/chat/sessions", headers=alice.headers, content=gen())
    print("chunked sessions", r.status_code, r.text[:200])
