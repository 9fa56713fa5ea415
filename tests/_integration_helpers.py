"""Readers for each sink's own files, used by tests/test_integrations*.py (test code only)."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import dimscope


def mlp(seed: int = 0, d_in: int = 12, hidden: int = 16, d_out: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def store_values(run_dir: Path) -> dict[tuple[int, str], float]:
    """{(step, 'dimscope/<layer>/<metric>'): value} for the primary convention and weights of a run."""
    run = dimscope.open_run(run_dir)
    df = run.scalars()
    prim = run.default_convention
    out = {}
    for r in df.itertuples(index=False):
        if r.space == "activation" and r.convention == prim:
            out[(int(r.step), f"dimscope/{r.layer}/{r.metric}")] = float(r.value)
        elif r.space == "weight":
            out[(int(r.step), f"dimscope/{r.layer}/weight/{r.metric}")] = float(r.value)
    run.close()
    return out


def read_tensorboard(log_dir: Path) -> dict[tuple[int, str], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def read_csv_sink(path: Path) -> dict[tuple[int, str], float]:
    with open(path, newline="") as fh:
        return {(int(r["step"]), r["key"]): float(r["value"]) for r in csv.DictReader(fh)}


def read_mlflow_files(root: Path, run_id: str) -> dict[tuple[int, str], float]:
    """Parse the file store directly: mlruns/<exp>/<run>/metrics/<key> holds 'timestamp value step' lines."""
    (run_dir,) = [p for p in root.glob(f"*/{run_id}") if p.is_dir()]
    out = {}
    mdir = run_dir / "metrics"
    for f in mdir.rglob("*"):
        if f.is_file():
            key = f.relative_to(mdir).as_posix()
            for line in f.read_text().splitlines():
                _, value, step = line.split()
                out[(int(step), key)] = float(value)
    return out


def read_wandb_offline(run_dir: Path) -> list[dict[str, object]]:
    """History rows of an offline run: parse the .wandb record log (LevelDB log format of protobuf Records).

    Layout: a 7-byte header (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks of chunks with a
    7-byte header (crc32 of type+data 4, length 2, type 1: full/first/middle/last). wandb >= 0.18 ships no Python
    reader, so the test reads the format itself.
    """
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list(Path(run_dir).glob("run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block = 32768
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"{path}: bad record checksum at byte {pos}")
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    rows = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item})
    return rows


def as_frame(d: dict[tuple[int, str], float]) -> pd.Series:
    return pd.Series(d).sort_index()
