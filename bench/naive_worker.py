"""The naive per-event worker the targets compare against (a baseline, not for production).

What a first version of such a service typically looks like: for every event, decode it, update
its window with one Redis round trip (push, trim, read back: one MULTI/EXEC), run the model on that
one window (batch 1), produce the forecast and wait for its acknowledgement; commit after each
fetched batch. Same model file, backend, thread count, decoder and forecast encoding as the real
worker, so the difference is the structure alone. Stops on SIGTERM/SIGINT.

    python bench/naive_worker.py --bootstrap-servers H:P --redis-url URL --model-dir DIR \
        --input-topic T --output-topic T --group-id G [--backend onnx] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct

import numpy as np
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from model.features import build_inputs
from model.registry import ModelRegistry
from stream.decode import Event, decode_event
from stream.publisher import encode_forecasts
from stream.windows import WindowBatch

_POINT = struct.Struct("<qdd")  # offset, ts, value


async def main(args: argparse.Namespace) -> int:
    loaded = ModelRegistry(args.model_dir).load(
        backend=args.backend, device="cpu", threads=args.threads
    )
    t = loaded.config.sequence_length
    r = aioredis.Redis.from_url(args.redis_url)
    consumer = AIOKafkaConsumer(
        args.input_topic, bootstrap_servers=args.bootstrap_servers, group_id=args.group_id,
        enable_auto_commit=False, auto_offset_reset="earliest",
    )  # fmt: skip
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap_servers, acks="all", enable_idempotence=True
    )
    await consumer.start()
    await producer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            got = await consumer.getmany(timeout_ms=200, max_records=500)
            for tp, recs in got.items():
                for rec in recs:
                    ev = decode_event(rec.key, rec.value)
                    if not isinstance(ev, Event):
                        continue
                    key = f"naive:{{{tp.partition}}}:{ev.series_id}"
                    async with r.pipeline(transaction=True) as pipe:
                        pipe.rpush(key, _POINT.pack(rec.offset, ev.ts, ev.value))
                        pipe.ltrim(key, -t, -1)
                        pipe.lrange(key, 0, -1)
                        _, _, points = await pipe.execute()
                    if len(points) < t:
                        continue
                    pts = np.array([_POINT.unpack(p) for p in points])  # (T, 3)
                    wb = WindowBatch(
                        tp.partition, [ev.series_id], np.array([rec.offset]),
                        np.array([rec.timestamp]), pts[None, :, 1], pts[None, :, 2], {},
                    )  # fmt: skip
                    x = build_inputs(wb.ts, wb.values, None, loaded.config)
                    fc = loaded.predictor.predict(x)
                    (msg,) = encode_forecasts(
                        wb, fc, version=loaded.version, input_topic=args.input_topic,
                        output_topic=args.output_topic,
                    )  # fmt: skip
                    fut = await producer.send(
                        msg.topic, msg.value, msg.key, timestamp_ms=msg.timestamp_ms,
                        headers=msg.headers,
                    )  # fmt: skip
                    await fut
            if got:
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()
        await r.aclose()
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap-servers", required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--input-topic", required=True)
    ap.add_argument("--output-topic", required=True)
    ap.add_argument("--group-id", required=True)
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse())))
