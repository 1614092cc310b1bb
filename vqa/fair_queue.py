"""A fair share of the app's queue for each client.

Gradio's queue has one bound, its `max_size`, shared by everyone: 800 joins from one client once
filled the 256 places, and every other user's question was refused with "Queue is full". Here a
join is refused (Gradio's own "queue_full" answer, with a message that says why) when the same
session already has `per_session` events waiting, or the same address `per_host` (a client that
makes up a new session for each request is still one address). The events that are running do
not count: a browser tab that asks, explains and draws attention maps at once waits for none.

    demo.queue(max_size=256)
    share_queue_fairly(demo, per_session=8, per_host=64)
"""

from collections import Counter

REFUSED = "queue_full"


def _host(request) -> str | None:
    client = getattr(request, "client", None)
    return getattr(client, "host", None)


def waiting(queue) -> tuple[Counter, Counter]:
    """(events waiting per session, per client address) in a Gradio queue."""
    sessions, hosts = Counter(), Counter()
    for event_queue in queue.event_queue_per_concurrency_id.values():
        for event in event_queue.queue:
            sessions[event.session_hash] += 1
            hosts[_host(event.request)] += 1
    return sessions, hosts


def fair_push(push, queue, per_session: int, per_host: int):
    """`queue.push` that first refuses a client holding its share of the waiting places."""

    async def push_fairly(body, request, username):
        sessions, hosts = waiting(queue)
        session = getattr(body, "session_hash", None)
        if session is not None and sessions[session] >= per_session:
            return False, (f"Too many requests waiting from this session ({sessions[session]}; at most "
                           f"{per_session}): wait for an answer before asking again."), REFUSED
        host = _host(request)
        if host is not None and hosts[host] >= per_host:
            return False, (f"Too many requests waiting from this address ({hosts[host]}; at most "
                           f"{per_host}): wait for answers before asking again."), REFUSED
        return await push(body, request, username)

    return push_fairly


def share_queue_fairly(demo, per_session: int = 8, per_host: int = 64):
    """Limit each session and each client address to their share of `demo`'s queue (call it after
    `demo.queue(...)`, before `launch`)."""
    queue = demo._queue  # Gradio keeps its Queue here (pinned gradio: requirements.txt)
    queue.push = fair_push(queue.push, queue, per_session, per_host)
    return demo
