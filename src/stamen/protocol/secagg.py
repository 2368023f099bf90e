"""Secure aggregation, SecAgg+ (Bell et al., CCS 2020): the server learns the sum only (sans-IO).

Two states, one per side, each with one transition table: :class:`SecAggServer` (one
round at the server, ``_SERVER_TRANSITIONS``) and :class:`SecAggNode` (a node's part,
``_NODE_TRANSITIONS``). They read and write plain config dicts (``str -> Scalar``), which
the driver carries over ordinary instructions, and draw every random byte from an
injected ``rng(n) -> bytes``. The stages::

    SETUP           server -> node  parameters, the node's secure id (sid), the version
                    node -> server  two X25519 public keys: pk1 (encryption), pk2 (masking),
                                    and its version (either side refuses another one)
    SHARE_KEYS      server -> node  its neighbours' public keys (num_shares nodes, itself too)
                    node -> server  for each neighbour, AEAD(ChaCha20-Poly1305, key from
                                    X25519(sk1, pk1_j) through HKDF) of the Shamir shares of
                                    its self-mask seed b and its masking key sk2
    COLLECT_MASKED  server -> node  the ciphertexts addressed to it (with the model to train)
                    node -> server  its weighted, quantized update + PRG(b)
                                    + sum of +-PRG(X25519(sk2, pk2_j)) over the neighbours j
                                    whose shares it received, modulo modulus_range
    UNMASK          server -> node  which of its neighbours sent a masked input (active) and
                                    which did not (dropped)
                    node -> server  its share of b for each active one, its share of sk2 for
                                    each dropped one -- never both for one node
    server: sum - PRG(b) of every active node, -+ the pairwise masks of the dropped ones
            (their sk2 rebuilt), = the sum of the active nodes' updates (secagg_math)

The server state folds each masked vector into one running sum as it arrives (memory
O(model), not O(nodes x model)). A node that fails or refuses at any stage is dropped;
the round goes on while every node that matters keeps ``reconstruction_threshold``
neighbours (its shares' holders) alive, and fails with the reason otherwise
(:attr:`SecAggServer.reason`).

Threat model: an honest-but-curious server and up to ``threshold - 1`` colluding nodes
among any node's neighbours learn nothing about one node's update beyond the sum. Like
Flower's SecAgg+, there is no signature on the advertised keys and no consistency round:
a server that lies about the keys or tells different nodes different dropout lists is
not covered (a node does refuse, within its own view, to reveal both shares of one node).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from ..errors import ConfigError, ProtocolError
from ..typing import Scalar
from . import secagg_math as sm
from .shamir import combine, split

__all__ = [
    "KEY_PREFIX",
    "KEY_STAGE",
    "KEY_VERSION",
    "VERSION",
    "NodeStage",
    "Request",
    "SecAggNode",
    "SecAggParams",
    "SecAggServer",
    "ServerStage",
    "is_secagg",
    "resolve_shares",
]

Rng = Callable[[int], bytes]

KEY_PREFIX = "stamen.secagg."
"""Every config key and property of the protocol starts with this (reserved)."""
KEY_STAGE = KEY_PREFIX + "stage"
KEY_ROUND = KEY_PREFIX + "round"
KEY_SID = KEY_PREFIX + "sid"
KEY_PK1 = KEY_PREFIX + "pk1"
KEY_PK2 = KEY_PREFIX + "pk2"
KEY_CT = KEY_PREFIX + "ct."
KEY_B = KEY_PREFIX + "b."
KEY_SK = KEY_PREFIX + "sk."
KEY_ACTIVE = KEY_PREFIX + "active"
KEY_DROPPED = KEY_PREFIX + "dropped"
KEY_VERSION = KEY_PREFIX + "version"

VERSION = 3
"""The protocol's version, sent both ways at SETUP: a server and a node of different
versions draw different masks (version 1 used AES-256-CTR, version 2 AES-128-CTR on the
counter blocks ``seed[16:32] + i``; version 3 counts on ``seed[16:28] || i`` from
``i = 2``, as AES-GCM does), so each refuses the other rather than produce a wrong sum."""

_AAD = b"stamen-secagg-v1"
_SECRET = 32
_NONCE = 12


class Request(Enum):
    """What the server asks of a node: the stages."""

    SETUP = "setup"
    SHARE_KEYS = "share_keys"
    COLLECT_MASKED = "masked"
    UNMASK = "unmask"


def is_secagg(config: Mapping[str, Scalar]) -> bool:
    """True if ``config`` is a SecAgg+ stage request."""
    return KEY_STAGE in config


# --- parameters ----------------------------------------------------------------------


def resolve_shares(
    num_shares: int | float, reconstruction_threshold: int | float, num_nodes: int
) -> tuple[int, int]:
    """``(num_shares, threshold)`` for a round of ``num_nodes``, as Flower 1.12 resolves
    them: a float is a fraction (of the nodes; of the shares), an int a count; an even
    number of shares below the node count becomes odd; shares are capped at the nodes.

    Raises:
        ConfigError: the threshold exceeds the shares, or is below 1.
    """
    if isinstance(num_shares, float):
        shares = round(num_shares * num_nodes)
        if shares < num_nodes and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = num_nodes
    else:
        shares = num_shares
        if shares != num_nodes and shares % 2 == 0:
            shares += 1
    shares = min(shares, num_nodes)
    if isinstance(reconstruction_threshold, float):
        threshold = max(2, round(reconstruction_threshold * shares))
    else:
        threshold = reconstruction_threshold
    if not 1 <= threshold <= shares:
        raise ConfigError(
            f"secagg: reconstruction_threshold {threshold} must lie in [1, num_shares] = "
            f"[1, {shares}] for {num_nodes} nodes"
        )
    return shares, threshold


@dataclass(frozen=True)
class SecAggParams:
    """A round's resolved parameters (Flower 1.12's names and meaning)."""

    num_shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float

    def to_config(self) -> dict[str, Scalar]:
        """As config entries."""
        return {
            KEY_PREFIX + "num_shares": self.num_shares,
            KEY_PREFIX + "threshold": self.threshold,
            KEY_PREFIX + "clipping_range": float(self.clipping_range),
            KEY_PREFIX + "quantization_range": self.quantization_range,
            KEY_PREFIX + "modulus_range": self.modulus_range,
            KEY_PREFIX + "max_weight": float(self.max_weight),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Scalar]) -> SecAggParams:
        """Read and check them.

        Raises:
            ProtocolError: missing or out-of-range values.
        """
        try:
            params = cls(
                num_shares=_int(config, KEY_PREFIX + "num_shares"),
                threshold=_int(config, KEY_PREFIX + "threshold"),
                clipping_range=_float(config, KEY_PREFIX + "clipping_range"),
                quantization_range=_int(config, KEY_PREFIX + "quantization_range"),
                modulus_range=_int(config, KEY_PREFIX + "modulus_range"),
                max_weight=_float(config, KEY_PREFIX + "max_weight"),
            )
        except KeyError as exc:
            raise ProtocolError(f"secagg: setup lacks {exc}") from None
        m = params.modulus_range
        if not (
            1 <= params.threshold <= params.num_shares
            and params.clipping_range > 0
            and params.max_weight > 0
            and 0 < params.quantization_range < m <= 2**32
            and m & (m - 1) == 0
        ):
            raise ProtocolError(f"secagg: parameters out of range: {params}")
        return params


def _check_version(entries: Mapping[str, Scalar], them: str, us: str) -> None:
    theirs = entries.get(KEY_VERSION)
    if theirs != VERSION or isinstance(theirs, bool):
        raise ProtocolError(
            f"secagg: refused: {them} runs SecAgg+ protocol version {theirs!r} (none: "
            f"version 1), {us} version {VERSION}: their masks would not cancel"
        )


def _int(config: Mapping[str, Scalar], key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"secagg: {key} must be an int, got {value!r:.40}")
    return value


def _float(config: Mapping[str, Scalar], key: str) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"secagg: {key} must be a number, got {value!r:.40}")
    return float(value)


def _bytes(config: Mapping[str, Scalar], key: str, length: int | None = None) -> bytes:
    value = config.get(key)
    if not isinstance(value, bytes) or (length is not None and len(value) != length):
        raise ProtocolError(f"secagg: {key} must be {length or 'some'} bytes")
    return value


def _sids(config: Mapping[str, Scalar], key: str) -> list[int]:
    value = config.get(key, "")
    if not isinstance(value, str):
        raise ProtocolError(f"secagg: {key} must be a str")
    try:
        return [int(part) for part in value.split(",") if part]
    except ValueError:
        raise ProtocolError(f"secagg: {key} must list secure ids, got {value!r:.40}") from None


def _join(sids: Sequence[int]) -> str:
    return ",".join(str(s) for s in sorted(sids))


def _keyed(config: Mapping[str, Scalar], prefix: str) -> dict[int, bytes]:
    """The ``prefix<sid>: bytes`` entries of ``config``, by sid."""
    found: dict[int, bytes] = {}
    for key, value in config.items():
        if key.startswith(prefix):
            suffix = key[len(prefix) :]
            if not suffix.isdigit() or not isinstance(value, bytes):
                raise ProtocolError(f"secagg: malformed entry {key!r}")
            found[int(suffix)] = value
    return found


# --- cryptography ----------------------------------------------------------------------


def _derive(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _private(secret: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(secret)


def _public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def _agree(private: X25519PrivateKey, public: bytes, info: bytes) -> bytes:
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # a low-order public key
        raise ProtocolError(f"secagg: unusable public key: {exc}") from None
    return _derive(shared, info)


def _pairwise_seed(sk2: X25519PrivateKey, pk2: bytes) -> bytes:
    return _agree(sk2, pk2, _AAD + b" pairwise mask")


def _channel_key(sk1: X25519PrivateKey, pk1: bytes) -> bytes:
    return _agree(sk1, pk1, _AAD + b" share encryption")


def _aad(server_round: int, src: int, dst: int) -> bytes:
    return b"%s|%d|%d|%d" % (_AAD, server_round, src, dst)


def _x(sid: int) -> int:
    """The Shamir point of a node."""
    return sid + 1


# --- the server --------------------------------------------------------------------------


class ServerStage(Enum):
    """Where a round is at the server."""

    SETUP = "setup"
    SHARE_KEYS = "share_keys"
    COLLECT_MASKED = "masked"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


class _Ended(Enum):
    OK = "ok"
    ABORT = "abort"


_SS = ServerStage
_SERVER_TRANSITIONS: dict[tuple[ServerStage, _Ended], ServerStage] = {
    (_SS.SETUP, _Ended.OK): _SS.SHARE_KEYS,
    (_SS.SHARE_KEYS, _Ended.OK): _SS.COLLECT_MASKED,
    (_SS.COLLECT_MASKED, _Ended.OK): _SS.UNMASK,
    (_SS.UNMASK, _Ended.OK): _SS.DONE,
    **{
        (stage, _Ended.ABORT): _SS.FAILED
        for stage in (_SS.SETUP, _SS.SHARE_KEYS, _SS.COLLECT_MASKED, _SS.UNMASK)
    },
}

_SERVER_REQUEST = {
    _SS.SETUP: Request.SETUP,
    _SS.SHARE_KEYS: Request.SHARE_KEYS,
    _SS.COLLECT_MASKED: Request.COLLECT_MASKED,
    _SS.UNMASK: Request.UNMASK,
}


class SecAggServer:
    """One SecAgg+ round at the server.

    Drive it stage by stage: send :meth:`configs` to the nodes, report each reply with
    :meth:`receive` (or :meth:`add_masked` in COLLECT_MASKED) and each failure with
    :meth:`drop`, then :meth:`advance`. When the stage is DONE, :meth:`result` is the
    reduced sum of the active nodes' quantized updates; FAILED has :attr:`reason`.

    Args:
        server_round: The round (bound into every ciphertext).
        node_ids: The sampled nodes (cids).
        params: The round's parameters.
        vector_length: 1 + the model's number of parameters.
        rng: Random bytes (the neighbour ring's order).
    """

    def __init__(
        self,
        server_round: int,
        node_ids: Sequence[str],
        params: SecAggParams,
        vector_length: int,
        rng: Rng,
    ) -> None:
        sm.check_capacity(len(node_ids), params.quantization_range, params.modulus_range)
        self.server_round = server_round
        self.params = params
        self.stage = ServerStage.SETUP
        self.reason: str | None = None
        order = list(node_ids)
        # Fisher-Yates with the injected randomness: who neighbours whom is not chosen.
        for i in range(len(order) - 1, 0, -1):
            j = int.from_bytes(rng(8), "big") % (i + 1)
            order[i], order[j] = order[j], order[i]
        self._cids = order
        self._sid = {cid: sid for sid, cid in enumerate(order)}
        n, half = len(order), params.num_shares // 2
        self._neighbours = [
            frozenset(range(n))
            if params.num_shares >= n
            else frozenset((s + o) % n for o in range(-half, half + 1))
            for s in range(n)
        ]
        self._active: set[int] = set(range(n))
        self._answered: set[int] = set()
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._forward: dict[int, dict[int, bytes]] = {s: {} for s in range(n)}
        self._masked_in: set[int] = set()
        self._dropped_masked: set[int] = set()
        self._total: NDArray[np.uint32] = np.zeros(vector_length, dtype=np.uint32)
        self._b_shares: dict[int, dict[int, bytes]] = {}
        self._sk_shares: dict[int, dict[int, bytes]] = {}
        self.dropouts: list[tuple[str, str, str]] = []
        """``(cid, stage, reason)`` of each node dropped, in order."""

    @property
    def request(self) -> Request:
        """What the current stage asks of the nodes.

        Raises:
            ProtocolError: the round has ended.
        """
        try:
            return _SERVER_REQUEST[self.stage]
        except KeyError:
            raise ProtocolError(f"secagg: the round has ended ({self.stage.value})") from None

    @property
    def active(self) -> list[str]:
        """The cids still in the round."""
        return [self._cids[s] for s in sorted(self._active)]

    def sid(self, cid: str) -> int:
        """The secure id of node ``cid``."""
        return self._sid[cid]

    def _fire(self, ended: _Ended) -> None:
        try:
            self.stage = _SERVER_TRANSITIONS[(self.stage, ended)]
        except KeyError:
            raise ProtocolError(
                f"secagg: stage end {ended.value!r} is not allowed in {self.stage.value!r}"
            ) from None

    def configs(self) -> dict[str, dict[str, Scalar]]:
        """The current stage's config for each active node (by cid)."""
        request = self.request
        out: dict[str, dict[str, Scalar]] = {}
        for sid in sorted(self._active):
            config: dict[str, Scalar] = {KEY_STAGE: request.value, KEY_ROUND: self.server_round}
            if request is Request.SETUP:
                config[KEY_SID], config[KEY_VERSION] = sid, VERSION
                config.update(self.params.to_config())
            elif request is Request.SHARE_KEYS:
                for other in self._neighbours[sid] & self._active:
                    pk1, pk2 = self._keys[other]
                    config[f"{KEY_PK1}.{other}"] = pk1
                    config[f"{KEY_PK2}.{other}"] = pk2
            elif request is Request.COLLECT_MASKED:
                for src, ciphertext in self._forward[sid].items():
                    config[f"{KEY_CT}{src}"] = ciphertext
            else:
                mine = self._neighbours[sid]
                config[KEY_ACTIVE] = _join([s for s in self._masked_in if s in mine])
                config[KEY_DROPPED] = _join([s for s in self._dropped_masked if s in mine])
            out[self._cids[sid]] = config
        return out

    def drop(self, cid: str, reason: str) -> None:
        """Node ``cid`` failed or refused in this stage: it leaves the round."""
        sid = self._sid[cid]
        if sid in self._active:
            self._active.discard(sid)
            self.dropouts.append((cid, self.stage.value, reason))

    def receive(self, cid: str, properties: Mapping[str, Scalar]) -> None:
        """Node ``cid``'s answer to SETUP, SHARE_KEYS or UNMASK.

        Raises:
            ProtocolError: a malformed answer (the caller drops the node).
        """
        sid = self._sid[cid]
        if sid not in self._active or sid in self._answered:
            raise ProtocolError(f"secagg: node {cid} is not expected to answer now")
        request = self.request
        if request is Request.SETUP:
            _check_version(properties, f"node {cid}", "this server")
            self._keys[sid] = (_bytes(properties, KEY_PK1, 32), _bytes(properties, KEY_PK2, 32))
        elif request is Request.SHARE_KEYS:
            ciphertexts = _keyed(properties, KEY_CT)
            expected = self._neighbours[sid] - {sid}
            if not set(ciphertexts) <= expected:
                raise ProtocolError(
                    f"secagg: node {cid} sent shares for {sorted(ciphertexts)}, not all its "
                    f"neighbours {sorted(expected)}"
                )
            for dst, ciphertext in ciphertexts.items():
                self._forward[dst][sid] = ciphertext
        elif request is Request.UNMASK:
            for owner, share in _keyed(properties, KEY_B).items():
                if owner in self._masked_in and owner in self._neighbours[sid]:
                    self._b_shares.setdefault(owner, {})[_x(sid)] = share
            for owner, share in _keyed(properties, KEY_SK).items():
                if owner in self._dropped_masked and owner in self._neighbours[sid]:
                    self._sk_shares.setdefault(owner, {})[_x(sid)] = share
        else:
            raise ProtocolError("secagg: masked inputs go to add_masked")
        self._answered.add(sid)

    def add_masked(self, cid: str, vector: NDArray[Any]) -> None:
        """Fold node ``cid``'s masked input into the running sum.

        Raises:
            ProtocolError: not a masked input of this round (wrong dtype or length, out
                of the modulus, a node not asked): the caller drops the node.
        """
        sid = self._sid[cid]
        if self.stage is not ServerStage.COLLECT_MASKED or sid not in self._active:
            raise ProtocolError(f"secagg: no masked input expected from node {cid}")
        if sid in self._masked_in:
            raise ProtocolError(f"secagg: node {cid} sent a second masked input")
        if vector.dtype != np.uint32 or vector.shape != self._total.shape:
            raise ProtocolError(
                f"secagg: node {cid} sent {vector.dtype}{list(vector.shape)}, not a masked "
                f"input (uint32[{self._total.size}]): a node without SecAgg+ is never "
                "aggregated in the clear"
            )
        if self.params.modulus_range != 2**32 and int(vector.max(initial=0)) >= (
            self.params.modulus_range
        ):
            raise ProtocolError(f"secagg: node {cid}'s masked input exceeds the modulus")
        sm.add_into(self._total, vector)
        self._masked_in.add(sid)

    def _abort(self, reason: str) -> bool:
        self.reason = reason
        self._fire(_Ended.ABORT)
        self._total = np.zeros(0, dtype=np.uint32)
        return False

    def _short_neighbourhood(self, alive: set[int], nodes: set[int]) -> str | None:
        t = self.params.threshold
        for sid in sorted(nodes):
            left = len(self._neighbours[sid] & alive)
            if left < t:
                return (
                    f"node {self._cids[sid]} has {left} neighbour(s) left holding its "
                    f"shares, fewer than reconstruction_threshold={t}"
                )
        return None

    def advance(self) -> bool:
        """End the current stage; False if the round failed (see :attr:`reason`)."""
        stage = self.stage
        # Nodes asked but silent are gone (their failure was reported with drop()).
        if stage is not ServerStage.COLLECT_MASKED:
            for sid in sorted(self._active - self._answered):
                self.drop(self._cids[sid], "no answer")
        else:
            for sid in sorted(self._active - self._masked_in):
                self.drop(self._cids[sid], "no masked input")
        self._answered = set()
        t = self.params.threshold
        if stage in (ServerStage.SETUP, ServerStage.SHARE_KEYS):
            short = self._short_neighbourhood(self._active, self._active)
            if short is not None:
                return self._abort(f"{stage.value}: {short}")
        elif stage is ServerStage.COLLECT_MASKED:
            self._dropped_masked = {
                src for dst in self._masked_in for src in self._forward[dst]
            } - self._masked_in
            if len(self._masked_in) < t:
                return self._abort(
                    f"masked input: only {len(self._masked_in)} node(s) sent one, fewer "
                    f"than reconstruction_threshold={t}"
                )
            short = self._short_neighbourhood(
                self._masked_in, self._masked_in | self._dropped_masked
            )
            if short is not None:
                return self._abort(f"masked input: {short}")
        elif stage is ServerStage.UNMASK:
            try:
                self._unmask()
            except ProtocolError as exc:
                return self._abort(f"unmask: {exc}")
        self._fire(_Ended.OK)
        return True

    def _unmask(self) -> None:
        """Remove every mask from the sum: each contributor's self mask, and the pairwise
        masks its neighbours added with the nodes that dropped before sending (all in one
        blocked pass over the sum, :func:`secagg_math.apply_masks`)."""
        add: list[bytes] = []
        subtract = [
            self._rebuild(sid, self._b_shares, "self mask") for sid in sorted(self._masked_in)
        ]
        for sid in sorted(self._dropped_masked):
            sk2 = _private(self._rebuild(sid, self._sk_shares, "masking key"))
            if _public(sk2) != self._keys[sid][1]:
                raise ProtocolError(
                    f"the shares of node {self._cids[sid]}'s masking key do not rebuild it"
                )
            for other in sorted(self._masked_in):
                if sid in self._forward[other]:  # ``other`` masked with ``sid``
                    # ``other`` added the mask if its sid is the smaller one: undo that.
                    undo = subtract if other < sid else add
                    undo.append(_pairwise_seed(sk2, self._keys[other][1]))
        sm.apply_masks(self._total, add, subtract)
        sm.reduce(self._total, self.params.modulus_range)

    def _rebuild(self, sid: int, shares: dict[int, dict[int, bytes]], what: str) -> bytes:
        """Node ``sid``'s secret from the first ``threshold`` of its ``shares``."""
        t = self.params.threshold
        mine = shares.get(sid, {})
        if len(mine) < t:
            dropped = "" if what == "self mask" else "dropped "
            raise ProtocolError(
                f"{len(mine)} share(s) of {dropped}node {self._cids[sid]}'s {what} came "
                f"back, fewer than reconstruction_threshold={t}"
            )
        return combine(dict(list(mine.items())[:t]), _SECRET)

    @property
    def contributors(self) -> list[str]:
        """The cids whose updates are in the sum (after COLLECT_MASKED)."""
        return [self._cids[s] for s in sorted(self._masked_in)]

    def result(self) -> NDArray[np.uint32]:
        """The reduced sum of the contributors' quantized updates.

        Raises:
            ProtocolError: the round is not DONE.
        """
        if self.stage is not ServerStage.DONE:
            raise ProtocolError(f"secagg: no result in stage {self.stage.value!r}")
        return self._total


# --- the node ------------------------------------------------------------------------------


class NodeStage(Enum):
    """Where a node is in the current round."""

    IDLE = "idle"
    KEYS_SENT = "keys_sent"
    SHARES_SENT = "shares_sent"
    MASKING = "masking"
    DONE = "done"


_NS = NodeStage
_NODE_TRANSITIONS: dict[tuple[NodeStage, Request], NodeStage] = {
    **{(stage, Request.SETUP): _NS.KEYS_SENT for stage in NodeStage},  # a new round
    (_NS.KEYS_SENT, Request.SHARE_KEYS): _NS.SHARES_SENT,
    (_NS.SHARES_SENT, Request.COLLECT_MASKED): _NS.MASKING,
    (_NS.MASKING, Request.UNMASK): _NS.DONE,
}


class SecAggNode:
    """A node's part in SecAgg+ rounds; it persists between stages as JSON
    (:meth:`dumps` / :meth:`loads`, kept in the node's ``context.state``).

    Each stage is a method that takes the server's config and returns the reply's
    properties; a request out of order, from another round, or asking for what an
    honest node must not give raises :class:`~stamen.errors.ProtocolError` (the node
    answers with an error and keeps its secrets).
    """

    def __init__(self, rng: Rng) -> None:
        self._rng = rng
        self.stage = NodeStage.IDLE
        self.server_round = -1
        self.sid = -1
        self.params: SecAggParams | None = None
        self._sk1 = b""
        self._sk2 = b""
        self._b = b""
        self._channels: dict[int, bytes] = {}  # neighbour -> key sealing its shares
        self._seeds: dict[int, bytes] = {}  # neighbour -> seed of our pairwise mask
        self._b_shares: dict[int, bytes] = {}
        self._sk_shares: dict[int, bytes] = {}
        self._masking: list[int] = []

    # persistence
    def dumps(self) -> str:
        """The state as JSON (secret keys included: it stays on the node)."""
        return json.dumps(
            {
                "stage": self.stage.value,
                "round": self.server_round,
                "sid": self.sid,
                "params": None if self.params is None else self.params.__dict__,
                "sk1": self._sk1.hex(),
                "sk2": self._sk2.hex(),
                "b": self._b.hex(),
                "channels": {str(k): v.hex() for k, v in self._channels.items()},
                "seeds": {str(k): v.hex() for k, v in self._seeds.items()},
                "b_shares": {str(k): v.hex() for k, v in self._b_shares.items()},
                "sk_shares": {str(k): v.hex() for k, v in self._sk_shares.items()},
                "masking": self._masking,
            }
        )

    @classmethod
    def loads(cls, text: str, rng: Rng) -> SecAggNode:
        """A node state from :meth:`dumps`."""
        data = json.loads(text)
        node = cls(rng)
        node.stage = NodeStage(data["stage"])
        node.server_round = data["round"]
        node.sid = data["sid"]
        node.params = None if data["params"] is None else SecAggParams(**data["params"])
        node._sk1 = bytes.fromhex(data["sk1"])
        node._sk2 = bytes.fromhex(data["sk2"])
        node._b = bytes.fromhex(data["b"])
        # .get: a state saved before these were kept (its round restarts at SETUP)
        node._channels = {int(k): bytes.fromhex(v) for k, v in data.get("channels", {}).items()}
        node._seeds = {int(k): bytes.fromhex(v) for k, v in data.get("seeds", {}).items()}
        node._b_shares = {int(k): bytes.fromhex(v) for k, v in data["b_shares"].items()}
        node._sk_shares = {int(k): bytes.fromhex(v) for k, v in data["sk_shares"].items()}
        node._masking = list(data["masking"])
        return node

    # transitions
    def request_of(self, config: Mapping[str, Scalar]) -> Request:
        """The stage ``config`` asks for.

        Raises:
            ProtocolError: an unknown stage.
        """
        try:
            return Request(config.get(KEY_STAGE))
        except ValueError:
            raise ProtocolError(f"secagg: unknown stage {config.get(KEY_STAGE)!r:.40}") from None

    def _enter(self, request: Request, config: Mapping[str, Scalar]) -> None:
        server_round = _int(config, KEY_ROUND)
        if request is not Request.SETUP and server_round != self.server_round:
            raise ProtocolError(
                f"secagg: {request.value} for round {server_round}, but this node set up "
                f"round {self.server_round}"
            )
        try:
            self.stage = _NODE_TRANSITIONS[(self.stage, request)]
        except KeyError:
            raise ProtocolError(
                f"secagg: refused: {request.value!r} is not allowed in stage "
                f"{self.stage.value!r} (each stage is answered once per round, in order)"
            ) from None
        self.server_round = server_round

    def _require_params(self) -> SecAggParams:
        if self.params is None:
            raise ProtocolError("secagg: no round was set up")
        return self.params

    def setup(self, config: Mapping[str, Scalar]) -> dict[str, Scalar]:
        """SETUP: new key pairs; the public keys."""
        _check_version(config, "the server", "this node")
        params = SecAggParams.from_config(config)
        sid = _int(config, KEY_SID)
        self._enter(Request.SETUP, config)
        self.params, self.sid = params, sid
        self._sk1, self._sk2 = self._rng(_SECRET), self._rng(_SECRET)
        self._b, self._channels, self._seeds = b"", {}, {}
        self._b_shares, self._sk_shares, self._masking = {}, {}, []
        return {
            KEY_PK1: _public(_private(self._sk1)),
            KEY_PK2: _public(_private(self._sk2)),
            KEY_VERSION: VERSION,
        }

    def share_keys(self, config: Mapping[str, Scalar]) -> dict[str, Scalar]:
        """SHARE_KEYS: the encrypted shares of b and sk2 for each neighbour."""
        self._enter(Request.SHARE_KEYS, config)
        params = self._require_params()
        pk1s, pk2s = _keyed(config, KEY_PK1 + "."), _keyed(config, KEY_PK2 + ".")
        if set(pk1s) != set(pk2s) or any(len(k) != 32 for k in (*pk1s.values(), *pk2s.values())):
            raise ProtocolError("secagg: malformed neighbour keys")
        sk1, sk2 = _private(self._sk1), _private(self._sk2)
        if pk1s.get(self.sid) != _public(sk1) or pk2s.get(self.sid) != _public(sk2):
            raise ProtocolError("secagg: refused: the server lists other keys for this node")
        if not params.threshold <= len(pk1s) <= params.num_shares:
            raise ProtocolError(
                f"secagg: refused: {len(pk1s)} neighbours, expected between "
                f"reconstruction_threshold={params.threshold} and num_shares={params.num_shares}"
            )
        others = sorted(set(pk1s) - {self.sid})
        # Both agreements with each neighbour, once: the stages after this one reuse them.
        self._channels = {sid: _channel_key(sk1, pk1s[sid]) for sid in others}
        self._seeds = {sid: _pairwise_seed(sk2, pk2s[sid]) for sid in others}
        self._b = self._rng(_SECRET)
        points = [_x(sid) for sid in sorted(pk1s)]
        b_shares = split(self._b, params.threshold, points, self._rng)
        sk_shares = split(self._sk2, params.threshold, points, self._rng)
        self._b_shares[self.sid] = b_shares[_x(self.sid)]
        self._sk_shares[self.sid] = sk_shares[_x(self.sid)]
        out: dict[str, Scalar] = {}
        for dst in others:
            nonce = self._rng(_NONCE)
            sealed = ChaCha20Poly1305(self._channels[dst]).encrypt(
                nonce,
                b_shares[_x(dst)] + sk_shares[_x(dst)],
                _aad(self.server_round, self.sid, dst),
            )
            out[f"{KEY_CT}{dst}"] = nonce + sealed
        return out

    def begin_masked(self, config: Mapping[str, Scalar]) -> None:
        """COLLECT_MASKED: take the shares the neighbours sent (before training)."""
        self._enter(Request.COLLECT_MASKED, config)
        params = self._require_params()
        ciphertexts = _keyed(config, KEY_CT)
        for src, ciphertext in ciphertexts.items():
            if src not in self._channels:
                raise ProtocolError(f"secagg: refused: shares from non-neighbour {src}")
            try:
                plaintext = ChaCha20Poly1305(self._channels[src]).decrypt(
                    ciphertext[:_NONCE],
                    ciphertext[_NONCE:],
                    _aad(self.server_round, src, self.sid),
                )
            except InvalidTag:
                raise ProtocolError(
                    f"secagg: refused: the shares from {src} do not verify"
                ) from None
            half = len(plaintext) // 2
            self._b_shares[src], self._sk_shares[src] = plaintext[:half], plaintext[half:]
        self._masking = sorted({*ciphertexts, self.sid})
        if len(self._masking) < params.threshold:
            raise ProtocolError(
                f"secagg: refused: shares from {len(self._masking)} node(s), fewer than "
                f"reconstruction_threshold={params.threshold}"
            )

    def mask(
        self,
        arrays: Sequence[NDArray[Any]],
        num_examples: int,
        out: NDArray[np.uint32] | None = None,
    ) -> NDArray[np.uint32]:
        """The masked input of the trained ``arrays`` (weighted by ``num_examples``),
        written to ``out`` if given (one value more than the parameters).

        Raises:
            ProtocolError: not in COLLECT_MASKED.
        """
        if self.stage is not NodeStage.MASKING or not self._b:
            raise ProtocolError("secagg: no masked input is due")
        params = self._require_params()
        # The self mask, and each pairwise mask: added by the smaller sid, subtracted by
        # the larger, so that they cancel in the sum; folded in as each block is quantized.
        others = [sid for sid in self._masking if sid != self.sid]
        vector = sm.quantize(
            arrays,
            num_examples,
            clipping_range=params.clipping_range,
            quantization_range=params.quantization_range,
            max_weight=params.max_weight,
            noise_seed=self._rng(_SECRET),
            out=out,
            add=[self._b] + [self._seeds[sid] for sid in others if self.sid < sid],
            subtract=[self._seeds[sid] for sid in others if self.sid > sid],
        )
        self._b = b""  # only its shares are needed now
        return sm.reduce(vector, params.modulus_range)

    def unmask(self, config: Mapping[str, Scalar]) -> dict[str, Scalar]:
        """UNMASK: b shares of the active neighbours, sk2 shares of the dropped ones."""
        params = self._require_params()
        active, dropped = set(_sids(config, KEY_ACTIVE)), set(_sids(config, KEY_DROPPED))
        both = active & dropped
        if both:
            raise ProtocolError(
                f"secagg: refused: the server asks for both the self-mask share and the "
                f"pairwise-mask share of node(s) {sorted(both)}"
            )
        if self.sid in dropped:
            raise ProtocolError("secagg: refused: this node is listed as dropped")
        unknown = (active | dropped) - set(self._masking)
        if unknown:
            raise ProtocolError(f"secagg: refused: node(s) {sorted(unknown)} shared nothing here")
        if len(active) < params.threshold:
            raise ProtocolError(
                f"secagg: refused: {len(active)} active node(s), fewer than "
                f"reconstruction_threshold={params.threshold}"
            )
        self._enter(Request.UNMASK, config)
        out: dict[str, Scalar] = {}
        for sid in sorted(active):
            out[f"{KEY_B}{sid}"] = self._b_shares[sid]
        for sid in sorted(dropped):
            out[f"{KEY_SK}{sid}"] = self._sk_shares[sid]
        # The round is over: forget its secrets.
        self._sk1 = self._sk2 = self._b = b""
        self._channels, self._seeds, self._b_shares, self._sk_shares = {}, {}, {}, {}
        return out
