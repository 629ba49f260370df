"""The connection room's accounting (api/connections.py): who a refusal blames."""

from __future__ import annotations

from stockade.api.connections import Room


def test_a_refusal_says_whether_the_client_or_the_server_is_full() -> None:
    room = Room(per_client=2, total=3)
    assert room.enter("a") == [] and room.enter("a") == []
    assert room.enter("a") is None and room.mine_full("a")  # its own share: "from here"
    assert room.enter("b") == []
    assert room.enter("c") is None and not room.mine_full("c")  # the server's: full
