"""The shape of protobuf messages as plain JSON-able data, for comparing descriptors.

Pure standard library plus protobuf's descriptor API: imported by the Stamen tests (dev
venv) and by ``flower_fleet_descriptors.py`` (Flower venv) alike, so both sides describe
their messages with the same code.
"""

from __future__ import annotations

from typing import Any


def short_name(full_name: str, package: str) -> str:
    """``flwr.proto.Task`` -> ``Task`` (nested types keep their outer names)."""
    return full_name.removeprefix(package + ".")


def _repeated(field: Any) -> bool:
    # protobuf 6+ has ``is_repeated``; older versions (Flower 1.12's venv) only ``label``.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == field.LABEL_REPEATED)


def describe_message(message: Any, package: str) -> list[dict[str, Any]]:
    """One dict per field: name, number, wire type, label, referenced type, oneof."""
    fields = []
    for field in message.fields:
        ref = field.message_type or field.enum_type
        fields.append(
            {
                "name": field.name,
                "number": field.number,
                "type": field.type,
                "repeated": _repeated(field),
                "ref": short_name(ref.full_name, package) if ref is not None else None,
                "oneof": field.containing_oneof.name if field.containing_oneof else None,
                "map_entry": bool(
                    field.message_type is not None and field.message_type.GetOptions().map_entry
                ),
            }
        )
    return sorted(fields, key=lambda f: f["number"])


def closure(service: Any) -> list[Any]:
    """Every message a service's methods use, directly or through fields, nested included."""
    seen: dict[str, Any] = {}
    todo = [m.input_type for m in service.methods] + [m.output_type for m in service.methods]
    while todo:
        message = todo.pop()
        if message.full_name in seen:
            continue
        seen[message.full_name] = message
        todo.extend(f.message_type for f in message.fields if f.message_type is not None)
    return [seen[name] for name in sorted(seen)]


def describe_service(service: Any, package: str) -> dict[str, Any]:
    """Methods (name -> [request, response]) and every message they use, by short name."""
    return {
        "methods": {
            m.name: [
                short_name(m.input_type.full_name, package),
                short_name(m.output_type.full_name, package),
            ]
            for m in service.methods
        },
        "messages": {
            short_name(m.full_name, package): describe_message(m, package) for m in closure(service)
        },
    }
