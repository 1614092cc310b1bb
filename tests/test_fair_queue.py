"""vqa/fair_queue.py: a session or an address holding its share of the waiting places is refused
with Gradio's own queue-full answer; everyone else still joins. The rule over Gradio's queue
structures here; against the running app in tests/test_app.py."""

import asyncio
from types import SimpleNamespace

from vqa.fair_queue import REFUSED, fair_push, waiting


def event(session: str, host: str) -> SimpleNamespace:
    # The two fields of gradio.queueing.Event the rule reads.
    return SimpleNamespace(session_hash=session, request=SimpleNamespace(client=SimpleNamespace(host=host)))


def queue_of(*events) -> SimpleNamespace:
    return SimpleNamespace(event_queue_per_concurrency_id={
        "predict": SimpleNamespace(queue=list(events[::2])), "explain": SimpleNamespace(queue=list(events[1::2]))})


def join(push, session: str, host: str):
    return asyncio.run(push(SimpleNamespace(session_hash=session), SimpleNamespace(client=SimpleNamespace(host=host)),
                            None))


def test_waiting_events_are_counted_across_concurrency_groups():
    queue = queue_of(*[event("a", "1.1.1.1")] * 3, event("b", "1.1.1.1"), event("c", "2.2.2.2"))
    sessions, hosts = waiting(queue)
    assert sessions == {"a": 3, "b": 1, "c": 1} and hosts == {"1.1.1.1": 4, "2.2.2.2": 1}


def test_a_session_or_an_address_at_its_share_is_refused_others_join():
    joined = []

    async def gradio_push(body, request, username):
        joined.append(body.session_hash)
        return True, "event-id", "success"

    queue = queue_of(*[event("flood", "1.1.1.1")] * 4, *[event(f"s{i}", "3.3.3.3") for i in range(6)])
    push = fair_push(gradio_push, queue, per_session=4, per_host=6)
    ok, message, state = join(push, "flood", "1.1.1.1")
    assert (ok, state) == (False, REFUSED) and "from this session (4; at most 4)" in message
    # A made-up new session from an address already holding 6 waiting events: refused by address.
    ok, message, state = join(push, "fresh", "3.3.3.3")
    assert (ok, state) == (False, REFUSED) and "from this address (6; at most 6)" in message
    assert join(push, "other", "1.1.1.1") == (True, "event-id", "success")  # same address, room left
    assert joined == ["other"]
    queue.event_queue_per_concurrency_id["predict"].queue.clear()  # the flood's events ran
    assert join(push, "flood", "1.1.1.1")[0] is True and joined == ["other", "flood"]
