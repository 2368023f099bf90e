"""Print Flower 1.12's ``flwr.proto.Fleet`` service as JSON (run by the Flower venv's python).

Usage: ``flower_fleet_descriptors.py`` -> one JSON line on stdout: the service's methods and
every message they use, each with its fields' names, numbers and types
(``proto_shapes.describe_service``).
"""

from __future__ import annotations

import json
import sys

import proto_shapes
from flwr.proto import fleet_pb2


def main() -> int:
    service = fleet_pb2.DESCRIPTOR.services_by_name["Fleet"]
    print(json.dumps(proto_shapes.describe_service(service, "flwr.proto")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
