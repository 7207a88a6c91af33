"""Store and AsyncStore are twins: the same public methods with the same parameters (names,
kinds, defaults and types), the async ones awaitable. Generic over every public method, so a
method added to one store and forgotten in the other fails here."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from pgstate import AsyncStore, Page, Store

# The only annotation differences allowed: the connection and engine types of each flavour.
_ASYNC_SPELLING = {"SyncConn": "AsyncConn", "Engine": "AsyncEngine"}


def public_methods(cls: type) -> dict[str, Callable[..., Any]]:
    methods: dict[str, Callable[..., Any]] = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        member = inspect.getattr_static(cls, name)
        assert inspect.isfunction(member), f"{cls.__name__}.{name} is not a plain method"
        methods[name] = member
    return methods


SYNC = public_methods(Store)
ASYNC = public_methods(AsyncStore)
ALL_NAMES = sorted(set(SYNC) | set(ASYNC))


def as_async(annotation: Any) -> Any:
    if not isinstance(annotation, str):
        return annotation
    for sync_name, async_name in _ASYNC_SPELLING.items():
        annotation = annotation.replace(sync_name, async_name)
    return annotation.replace("AsyncAsync", "Async")


def test_same_public_method_names() -> None:
    assert sorted(SYNC) == sorted(ASYNC)
    # The core of the API is there (guards against both losing a method together).
    assert {"append", "append_many", "read_stream", "read_all", "stream_state"} <= set(SYNC)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_same_parameters(name: str) -> None:
    assert name in SYNC, f"Store lacks {name}"
    assert name in ASYNC, f"AsyncStore lacks {name}"
    sync_params = list(inspect.signature(SYNC[name]).parameters.values())
    async_params = list(inspect.signature(ASYNC[name]).parameters.values())
    assert [(p.name, p.kind, p.default) for p in sync_params] == [
        (p.name, p.kind, p.default) for p in async_params
    ]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_same_annotations(name: str) -> None:
    sync_signature = inspect.signature(SYNC[name])
    async_signature = inspect.signature(ASYNC[name])
    assert [as_async(p.annotation) for p in sync_signature.parameters.values()] == [
        p.annotation for p in async_signature.parameters.values()
    ]
    assert as_async(sync_signature.return_annotation) == async_signature.return_annotation


@pytest.mark.parametrize("name", ALL_NAMES)
def test_async_methods_are_coroutine_functions(name: str) -> None:
    assert inspect.iscoroutinefunction(ASYNC[name])
    assert not inspect.iscoroutinefunction(SYNC[name])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_call_accepts_conn_keyword_or_is_lifecycle(name: str) -> None:
    # Every operation can run inside the caller's transaction (DESIGN 6). Exempt: the
    # store's lifecycle and setup, and wait_for, which waits for other transactions to
    # finish and would hold the watermark back itself if run inside one.
    parameters = inspect.signature(SYNC[name]).parameters
    if name in {"close", "migrate", "wait_for"}:
        assert "conn" not in parameters
        return
    assert "conn" in parameters
    conn = parameters["conn"]
    assert conn.kind is inspect.Parameter.KEYWORD_ONLY
    assert conn.default is None


def test_same_constructor() -> None:
    sync_params = inspect.signature(Store.__init__).parameters.values()
    async_params = inspect.signature(AsyncStore.__init__).parameters.values()
    assert [(p.name, p.kind, p.default) for p in sync_params] == [
        (p.name, p.kind, p.default) for p in async_params
    ]


def test_context_managers() -> None:
    assert callable(Store.__enter__) and callable(Store.__exit__)
    assert inspect.iscoroutinefunction(AsyncStore.__aenter__)
    assert inspect.iscoroutinefunction(AsyncStore.__aexit__)


def test_an_engine_of_the_other_flavour_is_a_type_error() -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    url = "postgresql+psycopg://nobody@127.0.0.1:1/none"  # never connected to
    with pytest.raises(TypeError, match="goes with AsyncStore"):
        Store(create_async_engine(url))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="goes with Store"):
        AsyncStore(create_engine(url))  # type: ignore[arg-type]


def first_stream(page: Page) -> str | None:
    # Typed use of a page: mypy --strict checks this file, so a Page whose iterator gave
    # Any would fail it (no-any-return).
    for event in page:
        return event.stream_id
    return None


def test_a_page_iterates_its_events() -> None:
    assert first_stream(Page([], None)) is None
