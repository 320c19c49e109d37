"""The layering of proxy/ (README, Development): what may import what, and where SQL may live.

    routes -> engine (proxy/turns) -> store / upstream / history / tokens -> errors, codec, config

Read from the source, never by importing it: every module's imports (at any depth, lazy ones
included), and every string of SQL handed to a connection.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

PROXY = Path(__file__).resolve().parent.parent / "proxy"
QUERY_METHODS = frozenset({"fetch", "fetchrow", "fetchval", "execute", "executemany", "cursor"})
SQL = re.compile(r"^\s*(WITH|SELECT|INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
WEB = ("litestar", "starlette", "uvicorn")
# The README's layers, top first: a module imports from its own layer or below.
LAYERS = [
    ("proxy.__main__", "proxy.app", "proxy.doctor", "proxy.server"),
    ("proxy.routes", "proxy.mcp"),
    ("proxy.access", "proxy.reading", "proxy.rawrequest", "proxy.chatbody", "proxy.openapi",
     "proxy.listing", "proxy.responses"),
    ("proxy.turns",),
    ("proxy.store", "proxy.upstream", "proxy.transport", "proxy.http1", "proxy.streamresponse",
     "proxy.history", "proxy.overlap", "proxy.tokens", "proxy.sse", "proxy.searchtext",
     "proxy.searchindex",
     "proxy.db", "proxy.pool", "proxy.migrate", "proxy.retention", "proxy.keylease", "proxy.auth",
     "proxy.metrics", "proxy.logs", "proxy.runtime", "proxy.summaries", "proxy.exports"),
    ("proxy.errors", "proxy.codec", "proxy.config", "proxy.configreport", "proxy.proxyenv",
     "proxy.schemas", "proxy.validation", "proxy.document", "proxy.ids", "proxy.timefmt",
     "proxy.cursor"),
]
HTTP_SIDE = ("proxy.app", "proxy.routes", "proxy.access", "proxy.reading", "proxy.rawrequest",
             "proxy.streamresponse", "proxy.openapi", "proxy.validation", "proxy.chatbody")


def module_name(path: Path) -> str:
    parts = path.relative_to(PROXY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for p in sorted(PROXY.rglob("*.py"))}


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Every module `tree` imports: `from proxy.x import y` is proxy.x.y when that is a module."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imports(tree, known) for name, tree in trees.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once (a strongly connected component of more than one module, or a
    module importing itself), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in edges:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def sql_calls(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, statement) for each string of SQL passed to a connection's query method: a literal,
    an f-string, or a module-level constant holding one."""
    constants: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            text = _text(node.value, {})
            if isinstance(target, ast.Name) and text is not None:
                constants[target.id] = text
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in QUERY_METHODS and node.args):
            text = _text(node.args[0], constants)
            if text is not None and SQL.match(text):
                yield node.lineno, text.strip().split("\n")[0]


def _text(node: ast.expr, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):  # the literal parts are enough to tell SQL
        return "".join(v.value for v in node.values
                       if isinstance(v, ast.Constant) and isinstance(v.value, str))
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left, constants), _text(node.right, constants)
        return left + right if left is not None and right is not None else None
    return None


# --- the checks themselves can fail ----------------------------------------------------------


def test_the_checks_see_what_they_look_for() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]] and cycles({"a": {"b"}, "b": set()}) == []
    source = ast.parse(
        'Q = """\n  WITH x AS (SELECT 1) SELECT * FROM x"""\n'
        "async def f(conn):\n"
        "    await conn.fetch(Q)\n"
        "    await conn.execute(f'DELETE FROM t WHERE a < {1}')\n"
        "    await conn.fetchval('SELECT ' + 'now()')\n"
        "    await conn.execute(name)\n"
        "    log.execute('not sql')\n"
    )
    assert [line for line, _ in sql_calls(source)] == [4, 5, 6]
    tree = ast.parse("from proxy.store import users\nfrom proxy.errors import BadRequest\n"
                     "def f():\n    import proxy.app\n")
    assert imports(tree, {"proxy.store.users", "proxy.errors"}) == {
        "proxy.store.users", "proxy.errors", "proxy.app"}
    edges = graph()
    assert len(edges) > 40 and "proxy.turns.engine" in edges["proxy.routes.chat"] | {
        i for name in edges["proxy.routes.chat"] for i in edges.get(name, ())}


# --- the rules ------------------------------------------------------------------------------


def layer(name: str) -> int:
    for depth, members in enumerate(LAYERS):
        if within(name, members):
            return depth
    raise AssertionError(f"{name} is in no layer: add it to the README's module list and here")


def test_each_module_imports_only_its_own_layer_or_below() -> None:
    edges = graph()
    wrong = [(name, target) for name, targets in edges.items() if name != "proxy"
             for target in targets if target in edges and target != "proxy"
             and layer(target) < layer(name)]
    assert wrong == []


def test_there_is_no_import_cycle_among_proxy_modules() -> None:
    edges = graph()
    proxy_only = {name: {t for t in targets if t in edges} for name, targets in edges.items()}
    assert cycles(proxy_only) == []


def test_a_route_module_never_imports_another_route_module() -> None:
    wrong = [(name, target) for name, targets in graph().items() if within(name, ("proxy.routes",))
             and name != "proxy.routes" for target in targets
             if within(target, ("proxy.routes",)) and target not in ("proxy.routes", name)]
    assert wrong == []


def test_only_the_cli_imports_the_app() -> None:
    importers = sorted(name for name, targets in graph().items() if "proxy.app" in targets)
    assert set(importers) <= {"proxy.__main__"}, importers
    assert not any("proxy.__main__" in targets for targets in graph().values())


def test_the_turn_engine_knows_nothing_of_http() -> None:
    wrong = [(name, target) for name, targets in graph().items()
             if within(name, ("proxy.turns",)) for target in targets
             if within(target, WEB) or within(target, HTTP_SIDE)]
    assert wrong == []


def test_the_store_imports_nothing_above_it() -> None:
    above = ("proxy.turns", "proxy.runtime", "proxy.upstream", "proxy.retention", *HTTP_SIDE)
    wrong = [(name, target) for name, targets in graph().items()
             if within(name, ("proxy.store",)) for target in targets
             if within(target, above) or within(target, WEB)]
    assert wrong == []


def test_sql_lives_only_in_the_store_package() -> None:
    found = {name: list(sql_calls(tree)) for name, tree in modules().items()}
    assert {name: calls for name, calls in found.items()
            if calls and not within(name, ("proxy.store",))} == {}
    # ... and the same finder does see the statements where they are.
    assert sum(len(calls) for name, calls in found.items() if within(name, ("proxy.store",))) > 40
