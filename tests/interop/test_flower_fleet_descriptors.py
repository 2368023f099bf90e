"""Stamen's Flower Fleet messages have exactly the fields of Flower 1.12's.

``wire/proto/stamen_flower_fleet.proto`` is Stamen's own file; only field numbers and types
travel on the wire, so they must equal those of the installed ``flwr==1.12.0``. Flower's
descriptors are read in its own venv (``peers/flower_fleet_descriptors.py``) and compared
with ours message by message, so a number cannot drift silently.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from stamen.wire._pb import stamen_flower_fleet_pb2 as ours

from ._harness import PEERS, flower_python, peer_env
from .peers import proto_shapes

pytestmark = pytest.mark.interop


def _flower_service() -> dict[str, object]:
    python = flower_python()
    done = subprocess.run(
        [str(python), str(PEERS / "flower_fleet_descriptors.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=peer_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert isinstance(result, dict)
    return result


def test_every_fleet_message_has_flowers_field_numbers_and_types() -> None:
    """Every message of Flower 1.12's Fleet service (requests, responses and all they use,
    map entries included) exists in Stamen's proto with the same field names, numbers,
    scalar types, repetition, referenced message names and oneofs; the service has the
    same methods with the same request and response messages; and Stamen's proto defines
    no message beyond them."""
    theirs = _flower_service()
    mine = proto_shapes.describe_service(
        ours.DESCRIPTOR.services_by_name["Fleet"], "stamen.flower.v1"
    )
    assert mine["methods"] == theirs["methods"]
    their_messages = theirs["messages"]
    assert isinstance(their_messages, dict)
    assert sorted(mine["messages"]) == sorted(their_messages)
    for name, fields in their_messages.items():
        assert mine["messages"][name] == fields, f"message {name} differs from Flower's"
    # Nothing defined beyond what the service uses (a stray message would go unchecked).
    top_level = set(ours.DESCRIPTOR.message_types_by_name)
    assert top_level <= set(mine["messages"])
