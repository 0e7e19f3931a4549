"""A pass-through consumer group member for the latency floor (``python -m bench.run --only
floor``): every input record goes straight back out as a one-field message naming its source,
through the worker's own clients and settings (aiokafka; fetch wait 50 ms; producer acks=all,
idempotent, no linger), with no decoding, windows, Redis or model. What the bench's reader then
measures is the path a forecast cannot avoid — through the broker twice, the clients, and the
scheduling of the processes on the machine — so a curve point can be split into that and the
worker's own share.

    python -m bench.echo_worker --bootstrap-servers B --input-topic T --output-topic T2 \
        --group-id G
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


async def run(a: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    consumer = AIOKafkaConsumer(
        a.input_topic, bootstrap_servers=a.bootstrap_servers, group_id=a.group_id,
        enable_auto_commit=True, auto_commit_interval_ms=500, auto_offset_reset="earliest",
        fetch_max_wait_ms=50, max_poll_records=2048,
    )  # fmt: skip
    producer = AIOKafkaProducer(
        bootstrap_servers=a.bootstrap_servers, acks="all", enable_idempotence=True, linger_ms=0
    )
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=2048)
            sent = []
            for tp, recs in batch.items():
                for r in recs:
                    src = {"topic": tp.topic, "partition": tp.partition, "offset": r.offset}
                    value = orjson.dumps({"source": src})
                    fut = await producer.send(
                        a.output_topic, value, key=r.key, partition=tp.partition
                    )
                    sent.append(fut)
            if sent:
                await asyncio.gather(*sent)
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
        await consumer.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap-servers", required=True)
    ap.add_argument("--input-topic", required=True)
    ap.add_argument("--output-topic", required=True)
    ap.add_argument("--group-id", required=True)
    asyncio.run(run(ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
