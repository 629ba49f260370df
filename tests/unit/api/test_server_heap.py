"""A started ``stockade server`` takes its startup objects out of the cyclic garbage
collector's sight (api/server.py ``settle_heap``: full collections went through them all)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from stockade.api.server import create_app
from stockade.cli.context import fleet_service, open_control


def test_the_started_server_freezes_what_it_holds(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STOCKADE_HOME", str(tmp_path / "home"))
    settings, control = open_control()
    app = create_app(settings, control, fleet_service(settings, control))

    async def started() -> int:
        async with app.app.router.lifespan_context(app.app):
            return gc.get_freeze_count()

    gc.unfreeze()
    try:
        assert asyncio.run(started()) > 10_000  # the modules, the app, its routes
    finally:
        gc.unfreeze()
        control.store.close()
