"""`rankcut export`: a saved compressed model as a plain dense Hugging Face folder."""

from __future__ import annotations

import argparse

from ..io.export import export_dense
from ..io.saved import read_manifest
from .common import _emit


def cmd_export(args: argparse.Namespace) -> None:
    manifest = read_manifest(args.model)  # a wrong folder is named before anything else happens
    exported = export_dense(args.model, args.out, overwrite=args.overwrite)
    out = exported.out
    payload = {"model": args.model, "out": str(out), "form": "dense", "params": exported.params,
               "bytes": exported.bytes, "compressed_params": manifest.get("params"),
               "compressed_bytes": manifest.get("bytes")}
    _emit(args, payload, lambda: print(
        f"wrote {out}: a plain Hugging Face folder, the factors multiplied back ({payload['params']:,} parameters, "
        f"{payload['bytes'] / 2**20:.1f} MiB; the compressed folder holds {payload['compressed_params'] or 0:,}). "
        "It loads without rankcut; its outputs are the compressed model's, its size and speed the dense model's."))
