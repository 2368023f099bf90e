"""SecAgg+ sans-IO: the server's and the nodes' states, driven without any network."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from stamen.errors import ConfigError, ProtocolError
from stamen.protocol import secagg_math as sm
from stamen.protocol.secagg import (
    KEY_ACTIVE,
    KEY_DROPPED,
    KEY_VERSION,
    NodeStage,
    SecAggNode,
    SecAggParams,
    SecAggServer,
    ServerStage,
    resolve_shares,
)

L = 2000
C, T, M = 8.0, 2**22, 2**32


def _rng(seed: int) -> Callable[[int], bytes]:
    generator = random.Random(seed)
    return lambda n: generator.randbytes(n)


def _params(n: int, shares: int | float, threshold: int | float) -> SecAggParams:
    k, t = resolve_shares(shares, threshold, n)
    return SecAggParams(k, t, C, T, M, 1000.0)


class Round:
    """A whole round: n nodes, nodes that die at given stages, and what the server saw."""

    def __init__(self, n: int, shares: int | float = 5, threshold: int | float = 3, seed: int = 0):
        self.server = SecAggServer(
            1, [f"n{i}" for i in range(n)], _params(n, shares, threshold), L + 1, _rng(seed)
        )
        self.nodes = {f"n{i}": SecAggNode(_rng(1000 + i + seed)) for i in range(n)}
        gen = np.random.default_rng(seed)
        self.data = {c: gen.uniform(-2, 2, L).astype(np.float32) for c in self.nodes}
        self.examples = {c: int(gen.integers(5, 500)) for c in self.nodes}
        self.seen: list[np.ndarray] = []

    def _stage(self, answer: Callable[[SecAggNode, Mapping], dict], dead: set[str]) -> bool:
        for cid, config in self.server.configs().items():
            if cid in dead:
                self.server.drop(cid, "killed")
                continue
            self.server.receive(cid, answer(self.nodes[cid], config))
        return self.server.advance()

    def run(self, dead: Mapping[str, set[str]] | None = None) -> bool:
        dead = dead or {}
        if not self._stage(lambda nd, cfg: nd.setup(cfg), dead.get("setup", set())):
            return False
        if not self._stage(lambda nd, cfg: nd.share_keys(cfg), dead.get("share_keys", set())):
            return False
        for cid, config in self.server.configs().items():
            if cid in dead.get("masked", set()):
                self.server.drop(cid, "killed")
                continue
            node = self.nodes[cid]
            node.begin_masked(config)
            vector = node.mask([self.data[cid]], self.examples[cid])
            self.seen.append(vector.copy())
            self.server.add_masked(cid, vector)
        if not self.server.advance():
            return False
        return self._stage(lambda nd, cfg: nd.unmask(cfg), dead.get("unmask", set()))

    def check_sum(self) -> None:
        who = self.server.contributors
        total = self.server.result()
        got = sm.dequantize(
            total, len(who), [(L,)], [np.dtype(np.float64)], clipping_range=C, quantization_range=T
        )[0]
        w = np.array([min(self.examples[c], 1000) for c in who], dtype=np.float64)
        want = (
            sum(wi * self.data[c].astype(np.float64) for wi, c in zip(w, who, strict=True))
            / w.sum()
        )
        q = [sm.weight_factor(self.examples[c], 1000.0, T) for c in who]
        bound = sm.error_bound(q, clipping_range=C, quantization_range=T)
        assert np.abs(got - want).max() <= bound


def test_all_nodes_give_the_weighted_mean_within_the_bound():
    r = Round(8)
    assert r.run()
    assert r.server.stage is ServerStage.DONE
    assert len(r.server.contributors) == 8
    r.check_sum()


@pytest.mark.parametrize("stage", ["setup", "share_keys", "masked", "unmask"])
def test_dropouts_up_to_the_threshold_at_each_stage(stage: str):
    r = Round(10, shares=7, threshold=4, seed=3)
    assert r.run({stage: {"n1", "n6"}}), r.server.reason
    r.check_sum()
    if stage in ("setup", "share_keys", "masked"):
        assert not {"n1", "n6"} & set(r.server.contributors)
    else:  # their inputs are in the sum; the others unmask them
        assert {"n1", "n6"} <= set(r.server.contributors)


def test_dropouts_at_several_stages_at_once():
    r = Round(12, shares=7, threshold=3, seed=4)
    assert r.run({"setup": {"n0"}, "share_keys": {"n3"}, "masked": {"n5"}, "unmask": {"n9"}})
    r.check_sum()


@pytest.mark.parametrize("stage", ["setup", "share_keys", "masked", "unmask"])
def test_beyond_the_threshold_the_round_fails_with_a_reason(stage: str):
    r = Round(6, shares=5, threshold=4, seed=5)
    assert not r.run({stage: {"n0", "n1", "n2"}})
    assert r.server.stage is ServerStage.FAILED
    assert r.server.reason and "reconstruction_threshold=4" in r.server.reason
    with pytest.raises(ProtocolError):
        r.server.result()


def _ks_uniform(values: np.ndarray) -> float:
    """sqrt(n) x the Kolmogorov-Smirnov distance of ``values`` to U(0, 1)."""
    x = np.sort(values)
    n = x.size
    above = np.arange(1, n + 1) / n - x
    below = x - np.arange(n) / n
    return float(max(above.max(), below.max()) * np.sqrt(n))


def test_masked_inputs_are_uniform_over_the_modulus():
    r = Round(6, shares=5, threshold=3, seed=6)
    # Updates far from uniform: every node sends the same constant.
    for cid in r.data:
        r.data[cid][:] = 1.0
    assert r.run()
    for vector in r.seen:
        assert _ks_uniform(vector[1:].astype(np.float64) / M) < 2.23  # alpha = 1e-4
        counts = np.bincount((vector[1:] >> 28).astype(np.int64), minlength=16)
        expected = counts.sum() / 16
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 42.6  # 15 degrees of freedom, alpha = 1e-4
    # and unmasked they are not: the quantized constant
    assert len(np.unique(r.seen[0][1:])) > L // 2


def test_a_node_refuses_both_shares_of_one_node():
    r = Round(5, shares=5, threshold=3, seed=7)
    server = r.server
    assert r._stage(lambda nd, cfg: nd.setup(cfg), set())
    assert r._stage(lambda nd, cfg: nd.share_keys(cfg), set())
    for cid, config in server.configs().items():
        r.nodes[cid].begin_masked(config)
        server.add_masked(cid, r.nodes[cid].mask([r.data[cid]], 10))
    assert server.advance()
    honest = r.nodes["n0"]
    config = dict(server.configs()["n0"])
    active = config[KEY_ACTIVE]
    assert isinstance(active, str)
    victim = (
        active.split(",")[0] if active.split(",")[0] != str(honest.sid) else active.split(",")[1]
    )
    malicious = {**config, KEY_DROPPED: victim}
    with pytest.raises(ProtocolError, match="both the self-mask share and the pairwise-mask share"):
        honest.unmask(malicious)
    # One answer per round: having given b shares, it gives no sk share afterwards.
    honest.unmask(config)
    assert honest.stage is NodeStage.DONE
    second = {**config, KEY_ACTIVE: "", KEY_DROPPED: victim}
    with pytest.raises(ProtocolError, match="refused"):
        honest.unmask(second)


def test_a_node_refuses_stages_out_of_order_and_other_rounds():
    node = SecAggNode(_rng(1))
    server = SecAggServer(4, ["a", "b", "c"], _params(3, 3, 2), 11, _rng(2))
    with pytest.raises(ProtocolError, match="not allowed"):
        node.share_keys({"stamen.secagg.stage": "share_keys", "stamen.secagg.round": -1})
    config = server.configs()["a"]
    node.setup(config)
    with pytest.raises(ProtocolError, match="round 5"):
        node.share_keys({"stamen.secagg.stage": "share_keys", "stamen.secagg.round": 5})


def test_state_survives_a_json_round_trip():
    r = Round(4, shares=3, threshold=2, seed=8)
    server = r.server
    assert r._stage(lambda nd, cfg: nd.setup(cfg), set())
    r.nodes = {c: SecAggNode.loads(n.dumps(), _rng(9)) for c, n in r.nodes.items()}
    assert r._stage(lambda nd, cfg: nd.share_keys(cfg), set())
    assert server.stage is ServerStage.COLLECT_MASKED


def test_resolve_shares_follows_flower():
    assert resolve_shares(1.0, 0.5, 10) == (10, 5)
    assert resolve_shares(0.5, 2, 10) == (5, 2)
    assert resolve_shares(4, 3, 10) == (5, 3)  # even below the node count becomes odd
    assert resolve_shares(20, 3, 10) == (10, 3)
    with pytest.raises(ConfigError):
        resolve_shares(3, 5, 10)


def test_capacity_is_checked():
    with pytest.raises(ConfigError, match="wrap"):
        SecAggServer(1, [str(i) for i in range(1024)], _params(1024, 5, 3), 3, _rng(0))


def test_quantization_round_trip_and_weights():
    gen = np.random.default_rng(0)
    x = gen.uniform(-C, C, 10_000)
    for n in (1, 999, 1000, 5000):
        v = sm.quantize(
            [x],
            n,
            clipping_range=C,
            quantization_range=T,
            max_weight=1000.0,
            noise_seed=gen.bytes(32),
        )
        assert v[0] == sm.weight_factor(n, 1000.0, T)
        back = sm.dequantize(
            v, 1, [(10_000,)], [np.dtype(np.float64)], clipping_range=C, quantization_range=T
        )[0]
        assert np.abs(back - x).max() <= sm.error_bound(
            [int(v[0])], clipping_range=C, quantization_range=T
        )


def test_prg_masks_are_deterministic_and_in_range():
    seed = bytes(range(32))
    a = sm.prg_mask(seed, 1000, 2**20)
    assert np.array_equal(a, sm.prg_mask(seed, 1000, 2**20))
    assert a.max() < 2**20
    assert not np.array_equal(a, sm.prg_mask(bytes(32), 1000, 2**20))


def test_masks_applied_in_blocks_are_the_whole_masks_summed():
    length = 2 * 2**15 + 5  # two whole blocks and a partial one
    seeds = [bytes([i]) * 32 for i in range(3)]
    total = np.arange(length, dtype=np.uint32)
    sm.apply_masks(total, seeds[:2], seeds[2:])
    want = np.arange(length, dtype=np.uint64)
    want += sm.prg_mask(seeds[0], length, 2**32).astype(np.uint64)
    want += sm.prg_mask(seeds[1], length, 2**32).astype(np.uint64)
    want -= sm.prg_mask(seeds[2], length, 2**32).astype(np.uint64)
    assert np.array_equal(total, want.astype(np.uint32))
    # a prefix of a mask is the mask of the shorter length
    assert np.array_equal(sm.prg_mask(seeds[0], 7, 2**32), sm.prg_mask(seeds[0], length, 2**32)[:7])


def test_the_mask_prg_is_aes_128_ctr_from_counter_2_of_the_seeds_nonce():
    seed = bytes(range(100, 132))
    length = 2**15 + 3
    iv = seed[16:28] + (2).to_bytes(4, "big")
    ctr = Cipher(algorithms.AES(seed[:16]), modes.CTR(iv)).encryptor()
    want = np.frombuffer(ctr.update(bytes(4 * length)), dtype="<u4")
    assert np.array_equal(sm.prg_mask(seed, length, 2**32), want)
    with pytest.raises(ConfigError, match="longer than one mask keystream"):
        sm.prg_mask(seed, 4 * 2**32, 2**32)


def test_quantizing_and_masking_in_one_pass_equals_masking_after():
    gen = np.random.default_rng(11)
    # layers that cross blocks, end inside one, fill one exactly, and are empty
    sizes = [5, 2**15 - 6, 2**15 + 17, 0, 3, 2 * 2**15 - 20, 1]
    arrays = [gen.uniform(-2 * C, 2 * C, n).astype(np.float32) for n in sizes]
    seeds = [gen.bytes(32) for _ in range(4)]
    quantized = dict(clipping_range=C, quantization_range=T, max_weight=1000.0)
    both = sm.quantize(
        arrays, 77, noise_seed=bytes(32), add=seeds[:3], subtract=seeds[3:], **quantized
    )
    after = sm.quantize(arrays, 77, noise_seed=bytes(32), **quantized)
    sm.apply_masks(after, seeds[:3], seeds[3:])
    assert both.size == 1 + sum(sizes)
    assert np.array_equal(both, after)
    nothing = sm.quantize([], 77, noise_seed=bytes(32), add=seeds[:1], **quantized)
    mask = int(sm.prg_mask(seeds[0], 1, 2**32)[0])
    assert nothing.tolist() == [(sm.weight_factor(77, 1000.0, T) + mask) % 2**32]


def test_stochastic_rounding_rounds_up_as_often_as_the_fraction_says():
    # weight 1 (q = T): x maps to x T / 2c + T / 2; pick x 0.3 of a step above a grid point
    step = 2 * C / T
    x = np.full(20_000, 1000 * step + 0.3 * step)
    v = sm.quantize(
        [x], 1000, clipping_range=C, quantization_range=T, max_weight=1000.0, noise_seed=bytes(32)
    )
    low = T // 2 + 1000
    assert set(np.unique(v[1:]).tolist()) == {low, low + 1}
    assert abs(float(np.mean(v[1:] == low + 1)) - 0.3) < 0.02  # 6 standard deviations


def test_a_server_and_a_node_of_other_protocol_versions_refuse_each_other():
    server = SecAggServer(1, ["a", "b", "c"], _params(3, 3, 2), 11, _rng(2))
    config = server.configs()["a"]
    old_server = {k: v for k, v in config.items() if k != KEY_VERSION}
    with pytest.raises(ProtocolError, match="version None"):
        SecAggNode(_rng(1)).setup(old_server)
    reply = SecAggNode(_rng(1)).setup(config)
    old_node = {k: v for k, v in reply.items() if k != KEY_VERSION}
    with pytest.raises(ProtocolError, match="version None"):
        server.receive("a", old_node)
    server.receive("a", reply)  # the same version is taken
