"""The operator's registry settings: mirrors, credentials file, CA bundle, each mistake named."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from stockade.config import Settings
from stockade.errors import ConfigError
from stockade.image.settings import registry_config


def _auth(tmp_path: Path, doc: object, mode: int = 0o600) -> str:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps(doc))
    path.chmod(mode)
    return str(path)


def test_mirrors_credentials_and_insecure_registries(tmp_path: Path) -> None:
    auth = _auth(tmp_path, {"auths": {"reg.example": {
        "auth": base64.b64encode(b"ci:pa:ss").decode()}}})
    config = registry_config(Settings(
        home=tmp_path, registry_mirrors=("reg.example=m1:5000", "reg.example=m2.internal"),
        insecure_registries=("127.0.0.1:5000",), registry_auth_file=auth))
    assert config.mirrors == {"reg.example": ("m1:5000", "m2.internal")}
    assert config.credentials == {"reg.example": ("ci", "pa:ss")}
    assert config.insecure == frozenset({"127.0.0.1:5000"})


@pytest.mark.parametrize("mirrors", [("reg.example",), ("=m1",), ("reg.example=https://m1/x",)])
def test_a_mirror_entry_must_be_registry_equals_mirror(tmp_path: Path,
                                                         mirrors: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="REGISTRY=MIRROR"):
        registry_config(Settings(home=tmp_path, registry_mirrors=mirrors))


@pytest.mark.parametrize("doc, why", [
    ({}, "no \"auths\""), ([], "no \"auths\""),
    ({"auths": {"r": {"auth": "not base64!"}}}, "no usable"),
    ({"auths": {"r": {"auth": base64.b64encode(b"nocolon").decode()}}}, "no usable"),
    ({"auths": {"r": {}}}, "no usable"),
])
def test_a_bad_credentials_file_is_named(tmp_path: Path, doc: object, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        registry_config(Settings(home=tmp_path, registry_auth_file=_auth(tmp_path, doc)))


def test_a_credentials_file_others_can_read_is_refused(tmp_path: Path) -> None:
    auth = _auth(tmp_path, {"auths": {}}, mode=0o644)
    with pytest.raises(ConfigError, match="read by others") as caught:
        registry_config(Settings(home=tmp_path, registry_auth_file=auth))
    assert caught.value.hint.startswith("chmod 600")
    with pytest.raises(ConfigError, match="No such file"):
        registry_config(Settings(home=tmp_path, registry_auth_file=str(tmp_path / "none")))
    with pytest.raises(ConfigError, match="cannot be read"):
        registry_config(Settings(home=tmp_path, registry_ca_file=str(tmp_path / "none.pem")))
