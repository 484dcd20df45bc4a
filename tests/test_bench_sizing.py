"""The sizing table's arithmetic (bench/sizing.py): each fleet it proposes fits every budget,
and one shard fewer would not; figures come from a bench report as documented."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.sizing import SIZES, Assumptions, Figures, figures, size

_MEASURED = Figures(
    memory_kb_per_stream=36.77,
    heartbeat_cores_per_stream=2.53e-6,
    delivery_us=111.0,
    ingest_us=52.8,
    connect_ms=1.045,
    broker_us_per_message=74.0,
    sources={},
)


@pytest.mark.parametrize("streams", SIZES)
@pytest.mark.parametrize("per_minute", [1.0, 10.0])
def test_each_proposed_fleet_fits_every_budget_and_one_shard_fewer_does_not(
    streams: int, per_minute: float
) -> None:
    assume = Assumptions()
    row = size(streams, per_minute, _MEASURED, assume)
    assert row.instances == row.shards * assume.instances_per_shard
    assert row.partitions == row.shards
    shares = (row.memory_share, row.cpu_share, row.cpu_after_loss_share, row.connect_share)
    assert max(shares) <= 1.0
    fewer = streams / ((row.shards - 1) * assume.instances_per_shard) if row.shards > 1 else 0
    if fewer:
        # The binding share grows with the streams per instance.
        assert fewer / row.streams_per_instance * max(shares) > 1.0


def test_rabbitmq_sends_each_message_to_every_instance_of_its_shard() -> None:
    row = size(1_000_000, 10.0, _MEASURED, replace(Assumptions(), instances_per_shard=3))
    assert row.messages_in == pytest.approx(1_000_000 * 10 / 60)
    assert row.messages_out == pytest.approx(3 * row.messages_in)
    assert row.bytes_out == pytest.approx(400 * row.messages_out)


def test_a_fleet_without_a_second_instance_per_shard_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 instances per shard"):
        size(100_000, 1.0, _MEASURED, replace(Assumptions(), instances_per_shard=1))


def test_ingest_cost_is_the_one_shard_instance_less_its_deliveries_at_s2_cost() -> None:
    fleet = {
        "shardings": [
            {
                "instances": [
                    {
                        "cpu_us_per_consumed_message": 60.0,
                        "consumed_messages": 1000,
                        "deliveries": 100,
                    }
                ],
                "broker_net_cpu_us_per_fleet_message": 70.0,
                "broker_background_cpu_percent": 1.0,
            }
        ]
    }
    s2 = {"server_cpu_us_per_delivery": 150.0}
    found = figures([{"scenarios": {"fleet": fleet}}, {"scenarios": {"s2": s2}}])
    # (60 µs x 1000 - 100 x 150 µs) / 900 unmatched messages.
    assert found.ingest_us == pytest.approx(50.0)
    assert found.delivery_us == 150.0
    assert found.broker_us_per_message == 70.0
    assert found.memory_kb_per_stream == 36.77  # no S1 given: the 54c1746 figure


def test_with_its_twin_lost_an_instance_delivers_all_of_its_shards_messages() -> None:
    assume = Assumptions()
    row = size(1_000_000, 10.0, _MEASURED, assume)
    n = 1_000_000 / row.instances
    # Twice the streams, each with its heartbeats and 10 deliveries a minute; nothing of
    # the shard left unmatched.
    cores = 2 * n * (_MEASURED.heartbeat_cores_per_stream + 10 / 60 * _MEASURED.delivery_us / 1e6)
    assert row.cpu_after_loss_share * assume.cpu_usable == pytest.approx(cores)
    normal = n * (
        _MEASURED.heartbeat_cores_per_stream
        + 10 / 60 * _MEASURED.delivery_us / 1e6
        + 10 / 60 * _MEASURED.ingest_us / 1e6
    )
    assert row.cpu_share * assume.cpu_usable == pytest.approx(normal)
